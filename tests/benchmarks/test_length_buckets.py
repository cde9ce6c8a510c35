"""benchmarks/length_buckets.py: windows of every length bucket and long recordings composed from a corpus split,
holding their clips' audio and text in order, and the real-speech manifests."""

import json

import numpy as np
import pytest
import soundfile

from benchmarks import length_buckets
from tests.conftest import FIXTURES, SPEECH_CLIPS
from whisper_rope.audio import load_audio
from whisper_rope.data import check_audio, read_manifest


def _corpus(tmp_path):
    """A corpus whose in-domain split is the speech fixtures three times over (24 clips of 2.2-3.5 s), and a real-dev
    folder of three of them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"audio": str(path), "text": path.with_suffix(".txt").read_text().strip()} for path in SPEECH_CLIPS]
    (corpus / "in-domain.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows * 3))
    real = tmp_path / "real"
    real.mkdir()
    (real / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:3]))
    return corpus, real, {row["audio"]: row["text"] for row in rows}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_windows_hold_their_clips_audio_and_text_in_order_in_every_bucket(tmp_path):
    corpus, real, texts = _corpus(tmp_path)
    out = tmp_path / "sets"
    argv = ["--corpus", str(corpus), "--out", str(out), "--splits", "in-domain", "--windows", "2"]
    assert length_buckets.main(argv + ["--long", "1", "--long-seconds", "45", "--real-dev", str(real)]) == 0
    summary = json.loads((out / "length_buckets.json").read_text())
    assert list(summary["sets"]) == [
        "in-domain-0-5s", "in-domain-5-10s", "in-domain-10-20s", "in-domain-20-30s", "in-domain-long",
        "real-dev", "real-dev-long",
    ]  # fmt: skip
    for slug, low, high in length_buckets.WINDOW_BUCKETS:
        manifest = out / f"in-domain-{slug}.jsonl"
        rows = _rows(manifest)
        examples = check_audio(read_manifest(manifest, strict=True), strict=True).examples
        assert len(rows) == len(examples) == 2
        for row, example in zip(rows, examples):
            assert low < example.duration <= high and abs(example.duration - row["duration"]) < 1e-3
            assert len(row["pauses"]) == len(row["clips"]) - 1
            assert all(0.3 <= pause <= 1.5 for pause in row["pauses"])
            assert row["text"] == " ".join(texts[clip] for clip in row["clips"])
    # The audio of a window of several clips: each clip's samples where its pauses put it, silence between.
    row = _rows(out / "in-domain-10-20s.jsonl")[0]
    audio, _ = soundfile.read(out / row["audio"], dtype="float32")
    position = 0
    for i, clip in enumerate(row["clips"]):
        samples = load_audio(clip)
        assert np.array_equal(audio[position : position + len(samples)], samples)
        position += len(samples)
        if i < len(row["pauses"]):
            pause = round(row["pauses"][i] * 16_000)
            assert not audio[position : position + pause].any()
            position += pause
    assert position == len(audio)

    [long] = _rows(out / "in-domain-long.jsonl")
    assert long["duration"] >= 45 and long["text"] == " ".join(texts[clip] for clip in long["clips"])
    assert len(long["pauses"]) == len(long["clips"]) - 1

    real_rows = _rows(out / "real-dev.jsonl")
    assert [row["audio"] for row in real_rows] == [str(path) for path in SPEECH_CLIPS[:3]]
    [real_long] = _rows(out / "real-dev-long.jsonl")
    assert real_long["clips"] == [str(path) for path in SPEECH_CLIPS[:3]]
    expected = sum(row["duration"] for row in real_rows) + sum(real_long["pauses"])
    assert abs(real_long["duration"] - expected) < 0.01


def test_a_split_too_small_for_a_bucket_is_one_line(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    row = {"audio": str(FIXTURES / "speech" / "flite_kal.flac"), "text": "one clip"}
    (corpus / "in-domain.jsonl").write_text(json.dumps(row) + "\n")
    argv = ["--corpus", str(corpus), "--out", str(tmp_path / "sets"), "--splits", "in-domain", "--long", "0"]
    assert length_buckets.main(argv) == 1  # one clip makes one window, however many passes compose it
    error = capsys.readouterr().err.strip()
    assert error.startswith("length_buckets.py: error: only 1 windows of 0-5 s could be composed from 1 clips")
    assert "\n" not in error
    argv += ["--windows", "1"]  # the first bucket is written, the next has no window
    assert length_buckets.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("length_buckets.py: error: only 0 windows of 5-10 s could be composed from 1 clips")
    assert "\n" not in error
    with pytest.raises(SystemExit):  # the sets it began to write are not replaced without --overwrite
        length_buckets.main(argv)
    assert "sets/in-domain-0-5s exists (and 0 more sets): pass --overwrite" in capsys.readouterr().err
