"""The benchmark corpus builder: deterministic from its seed, splits with disjoint text, 16 kHz mono FLAC."""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from benchmarks.corpus import ClipSpec, Voice, build_corpus, synthesize_within

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SPLITS = ("train", "in-domain", "retained", "retained-festival")
ENGINE_OF = {"train": "espeak-ng", "in-domain": "espeak-ng", "retained": "flite", "retained-festival": "festival"}


@pytest.fixture(autouse=True)
def _tts_engines():
    """These tests synthesise speech: a missing engine is a failure (CI installs them), never a silent skip."""
    missing = [tool for tool in ("espeak-ng", "flite", "text2wave") if shutil.which(tool) is None]
    assert not missing, (
        f"needs {' and '.join(missing)} (apt-get install espeak-ng flite festival festvox-kallpc16k "
        "festvox-kdlpc16k festvox-us-slt-hts)"
    )


def _benchmark_module(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(out: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python benchmarks/build_corpus.py --out OUT --seed SEED --small``, run in this process."""
    build = _benchmark_module("build_corpus", monkeypatch)
    assert build.main(["--out", str(out), "--seed", str(seed), "--small", "--no-progress"]) == 0


def _fingerprint(out: Path) -> dict:
    """Manifest bytes and the SHA-256 of every audio file, by relative path."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "corpus.json")
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "seed1"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _build(out, 1, monkeypatch)
    return out


def _rows(out: Path, split: str) -> list:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_manifests_and_audio(small_corpus, tmp_path, monkeypatch):
    _build(tmp_path / "again", 1, monkeypatch)
    _build(tmp_path / "other", 2, monkeypatch)
    first = _fingerprint(small_corpus)
    assert len(first) == 4 + 12 + 6 + 6 + 6
    assert _fingerprint(tmp_path / "again") == first
    other = _fingerprint(tmp_path / "other")
    assert other.keys() == first.keys()
    assert all(other[f"{split}.jsonl"] != first[f"{split}.jsonl"] for split in SPLITS)
    assert sum(other[name] != first[name] for name in first if name.endswith(".flac")) == 30


def test_small_corpus_layout_voices_and_durations(small_corpus):
    sizes = {"train": 12, "in-domain": 6, "retained": 6, "retained-festival": 6}
    for split in SPLITS:
        rows = _rows(small_corpus, split)
        assert len(rows) == sizes[split]
        assert {row["engine"] for row in rows} == {ENGINE_OF[split]}
        for row in rows:
            info = sf.info(small_corpus / row["audio"])
            assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
            assert info.frames / 16000 == pytest.approx(row["duration"], abs=1e-3)
            assert 2.0 <= row["duration"] <= 5.0
            assert row["audio"] == f"{split}/{row['id']}.flac"
    summary = json.loads((small_corpus / "corpus.json").read_text())
    assert summary["seed"] == 1 and summary["splits"]["train"]["clips"] == 12


def test_no_sentence_is_shared_between_splits(small_corpus, monkeypatch):
    built = {split: {row["text"] for row in _rows(small_corpus, split)} for split in SPLITS}
    evaluation = [built[split] for split in SPLITS[1:]]
    assert not built["train"] & set().union(*evaluation)
    assert sum(map(len, evaluation)) == len(set().union(*evaluation))
    # At full size too (the plan only: which sentence each clip says), and every sentence distinct.
    build = _benchmark_module("build_corpus", monkeypatch)
    plan = build.corpus_plan(0, build.SIZES)
    texts = [clip.text for clips in plan.values() for clip in clips]
    assert len(texts) == len(set(texts)) == 1680


def test_training_and_evaluation_grammars_share_only_function_words(monkeypatch):
    sentences = _benchmark_module("sentences", monkeypatch)
    train = sentences.TRAIN.vocabulary() | sentences.TRAIN.template_words()
    evaluation = sentences.EVALUATION.vocabulary() | sentences.EVALUATION.template_words()
    assert train & evaluation <= sentences.FUNCTION_WORDS
    assert len(train) > 150 and len(evaluation) > 150


def test_long_sentence_is_respoken_faster_to_fit_the_range():
    text = "The ancient lighthouse keeper counted every passing ship through the long and stormy night."
    audio, voice = synthesize_within(text, Voice("espeak-ng", "en-us", speed=0.6), (2.0, 5.0))
    assert 2.0 <= len(audio) / 16000 <= 5.0
    assert voice.speed > 0.6


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown speech engine 'say'"):
        Voice("say", "Alex")
    with pytest.raises(ValueError, match="festival has no voice 'no_such_voice'"):
        build_corpus(tmp_path / "bad", {"test": [ClipSpec("a", "Hi.", Voice("festival", "no_such_voice"))]})
    clip = ClipSpec("a", "Hello there.", Voice("flite", "slt"))
    with pytest.raises(ValueError, match="repeated clip ids"):
        build_corpus(tmp_path, {"test": [clip, clip]}, progress=False)
    build_corpus(tmp_path, {"test": [clip]}, jobs=1, progress=False)
    with pytest.raises(ValueError, match="already exists"):
        build_corpus(tmp_path, {"test": [clip]}, jobs=1, progress=False)
    with pytest.raises(ValueError, match="espeak-ng has no voice .no-such-voice."):
        unknown = ClipSpec("b", "Hi.", Voice("espeak-ng", "no-such-voice"))
        build_corpus(tmp_path, {"other": [unknown]}, jobs=1, progress=False)


def test_diverse_split_is_reproducible_new_text_and_many_voices(monkeypatch):
    build = _benchmark_module("build_corpus", monkeypatch)
    train = [clip.text for clip in build.corpus_plan(0, build.SIZES)["train"]]
    variants = build.espeak_variants()
    assert len(variants) > 20 and not {"whisper", "whisperf"} & {v.lower() for v in variants}
    clips = build.diverse_plan(0, 1920, train, variants)
    assert clips == build.diverse_plan(0, 1920, train, variants)
    # the published long run's split (docs/results.md) starts with these clips
    assert clips[0].text == "Someone sold my basket and hid it in the attic."
    assert (clips[0].voice.name, clips[0].voice.speed, clips[0].voice.pitch) == ("en-gb-x-gbcwmd+robosoft6", 1.013, 68)
    assert not {clip.text for clip in clips} & set(train) and len({clip.text for clip in clips}) == 1920
    assert len({clip.voice.name for clip in clips}) > 150
    assert all(0.7 <= clip.voice.speed <= 1.3 and 20 <= clip.voice.pitch <= 80 for clip in clips)
