"""evaluate on recordings over 30 s (upstream's loop and the batched long-form path, the same text as
``whisper-rope transcribe``) and its scores per clip length."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
from whisper.audio import SAMPLE_RATE

import whisper_rope
from tests.conftest import FIXTURES, randomise_, small_dims
from whisper_rope import cli
from whisper_rope.audio import load_audio
from whisper_rope.cli.evaluate import main
from whisper_rope.data import DataError, check_audio, read_manifest
from whisper_rope.evaluation.evaluate import evaluate
from whisper_rope.evaluation.metrics import length_bucket, length_bucket_table, length_buckets
from whisper_rope.experiments.compare import CompareConfig, length_bucket_tables
from whisper_rope.experiments.report import _table, final_evaluation
from whisper_rope.training.config import FinetuneConfig

from .test_evaluate import _one_thread  # noqa: F401  (module-scoped, autouse: tiny.en decodes on one thread)

SPEECH = FIXTURES / "speech"
NAMES = ["flite_slt", "espeak_en", "flite_kal", "espeak_en_us", "flite_awb", "espeak_en_f3", "espeak_en_m3"]
NAMES += ["espeak_en_us_f2", "flite_slt", "espeak_en"]


def _row(seconds, substitutions=0, deletions=0, insertions=0, n_words=10, capped=False):
    return SimpleNamespace(
        seconds=seconds,
        substitutions=substitutions,
        deletions=deletions,
        insertions=insertions,
        n_words=n_words,
        capped=capped,
    )


def test_length_buckets_pool_the_edits_of_their_clips():
    rows = [
        _row(2.0, substitutions=1),
        _row(5.0, deletions=2, n_words=20),  # 5 s is still the first bucket
        _row(5.01, insertions=3, capped=True),
        _row(29.9, n_words=40, substitutions=4),
        _row(30.0, n_words=0),
        _row(95.5, deletions=30, n_words=200),
    ]
    buckets = length_buckets(rows)
    assert [(b.bucket, b.clips, b.seconds, b.errors, b.n_words, b.n_capped) for b in buckets] == [
        ("≤ 5 s", 2, 7.0, 3, 30, 0),
        ("5–10 s", 1, 5.01, 3, 10, 1),
        ("20–30 s", 2, 59.9, 4, 40, 0),
        ("> 30 s", 1, 95.5, 30, 200, 0),
    ]
    assert [b.wer for b in buckets] == [0.1, 0.3, 0.1, 0.15]
    assert length_bucket(10.0) == "5–10 s" and length_bucket(10.5) == "10–20 s"
    assert length_buckets([_row(3.0, n_words=0)])[0].wer is None


def test_length_bucket_table_shows_models_side_by_side():
    source = [{"bucket": "≤ 5 s", "clips": 2, "seconds": 7.0, "wer": 0.1, "n_capped": 0}]
    adapted = source + [{"bucket": "> 30 s", "clips": 1, "seconds": 95.5, "wer": 0.5, "n_capped": 1}]
    table = length_bucket_table({"source": source, "adapted": adapted}).splitlines()
    assert table[0] == "| length | clips | seconds | source WER % | source capped | adapted WER % | adapted capped |"
    assert table[2:] == ["| ≤ 5 s | 2 | 7.0 | 10.0 | 0/2 | 10.0 | 0/2 |", "| > 30 s | 1 | 95.5 | – | – | 50.0 | 1/1 |"]


def _buckets(short_wer, long_wer, long_capped):
    return [
        {"bucket": "≤ 5 s", "clips": 3, "seconds": 9.5, "wer": short_wer, "n_capped": 0},
        {"bucket": "> 30 s", "clips": 1, "seconds": 120.0, "wer": long_wer, "n_capped": long_capped},
    ]


def test_compare_reports_each_runs_wer_per_clip_length_as_the_mean_over_seeds():
    def evaluation(decoding, buckets):
        return {"set": "real", "decoding": decoding, "buckets": buckets}

    run = {"run": "rotary", "variant": "rotary/rotary", "steps": 2, "train_seconds": 1.0, "seconds_per_step": 0.5}
    run["final_loss"] = 1.0
    results = {
        "before": {"run": "before", "variant": "whisper", "evaluations": [evaluation("padded", _buckets(0.1, 0.2, 0))]},
        "runs": [
            {**run, "seed": 0, "evaluations": [evaluation("unpadded", _buckets(0.2, 0.5, 1))]},
            {**run, "seed": 1, "evaluations": [evaluation("unpadded", _buckets(0.3, 0.6, 0))]},
            # stored before buckets were reported: no column
            {**run, "run": "old", "seed": 0, "evaluations": [{"set": "real", "decoding": "padded"}]},
        ],
    }
    table = length_bucket_tables(results, CompareConfig(eval=["real=real.jsonl"])).splitlines()
    assert table[0] == "WER per clip length on `real`:"
    assert table[2].startswith(
        "| length | clips | seconds | before padded WER % | before padded capped | rotary unpadded"
    )
    assert table[4:6] == [
        "| ≤ 5 s | 3 | 9.5 | 10.0 | 0/3 | 25.0 | 0/3 |",
        "| > 30 s | 1 | 120.0 | 20.0 | 0/1 | 55.0 | 0.5/1 |",
    ]


def test_the_recipes_final_table_shows_source_and_adapted_model_per_clip_length():
    row = {"capped": 0, "clips": 4, "wer_without_capped": 0.1, "rtf": 0.1, "variant": "rotary/learned"}
    rows = [
        {**row, "model": "source", "input": "30-s windows", "wer": 0.1, "buckets": _buckets(0.05, 0.2, 0)},
        {**row, "model": "fine-tuned", "input": "unpadded", "wer": 0.3, "buckets": _buckets(0.1, 0.9, 1)},
    ]
    lines = _table(rows, "real.jsonl", "the manifest's text").splitlines()
    assert "| length | clips | seconds | source (30-s windows) WER % | source (30-s windows) capped |" in lines[9]
    assert lines[11:] == [
        "| ≤ 5 s | 3 | 9.5 | 5.0 | 0/3 | 10.0 | 0/3 |",
        "| > 30 s | 1 | 120.0 | 20.0 | 0/1 | 90.0 | 1/1 |",
    ]


def test_check_audio_keeps_long_recordings_only_when_asked(tmp_path):
    soundfile.write(tmp_path / "long.wav", np.zeros(31 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    (tmp_path / "m.jsonl").write_text('{"audio": "long.wav", "text": "nothing"}\n')
    manifest = read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match="31.0 s long; a Whisper window holds at most 30 s"):
        check_audio(manifest, strict=True)
    assert [example.duration for example in check_audio(manifest, strict=True, max_seconds=None).examples] == [31.0]


# ---- real tiny.en --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A manifest of one ~35-s recording (ten fixture sentences, 0.3-1.5 s pauses) and one short fixture clip."""
    folder = tmp_path_factory.mktemp("long")
    pauses = np.random.default_rng(0).uniform(0.3, 1.5, len(NAMES))
    pieces = []
    for name, pause in zip(NAMES, pauses):
        pieces += [load_audio(SPEECH / f"{name}.flac"), np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32)]
    audio = np.concatenate(pieces)
    assert 33 < len(audio) / SAMPLE_RATE < 40
    soundfile.write(folder / "long.wav", audio, SAMPLE_RATE)
    text = " ".join((SPEECH / f"{name}.txt").read_text().strip() for name in NAMES)
    rows = [{"audio": str(SPEECH / "flite_kal.flac"), "text": (SPEECH / "flite_kal.txt").read_text().strip()}]
    rows.append({"audio": "long.wav", "text": text})
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _transcribe_cli(recording, batch_size: str, tmp_path) -> str:
    """The text ``whisper-rope transcribe`` writes for the recording, decoding as evaluate does (greedy, fp32 as
    `load_model` and ``--compute_type float32``, temperature 0 without fallback)."""
    status = cli.main(
        ["transcribe", "--model", "tiny.en", "--device", "cpu", "--compute_type", "float32", "--fp16", "False"]
        + ["--batch_size", batch_size]
        + ["--beam_size", "None", "--temperature", "0", "--temperature_increment_on_fallback", "None"]
        + ["--verbose", "False", "-f", "json", "--output_dir", str(tmp_path), str(recording / "long.wav")]
    )
    assert status == 0
    return json.loads((tmp_path / "long.json").read_text())["text"].strip()


def test_evaluate_transcribes_a_long_recording_through_upstreams_loop_as_transcribe_does(recording, tmp_path, capsys):
    output = tmp_path / "out.json"
    data = str(recording / "data.jsonl")
    argv = ["--model", "tiny.en", "--compute_type", "float32", "--data", data, "-o", str(output), "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "1 recording over 30 s transcribed through upstream's window-by-window loop" in printed
    summary = json.loads(output.read_text())
    assert summary["compute_type"] == "float32"
    rows = [json.loads(line) for line in output.with_suffix(".jsonl").read_text().splitlines()]
    assert summary["long_form"] == "loop" and summary["n_utterances"] == 2
    assert [row["long_form"] for row in rows] == [None, "loop"]
    long = rows[1]
    assert long["seconds"] > 33 and not long["capped"] and long["cap"] > 224
    assert long["hypothesis"] == _transcribe_cli(recording, "1", tmp_path / "loop")
    assert long["wer"] < 0.2  # ten sentences read back, not only the first
    assert [(b["bucket"], b["clips"]) for b in summary["buckets"]] == [("≤ 5 s", 1), ("> 30 s", 1)]
    assert summary["buckets"][1]["errors"] == long["substitutions"] + long["deletions"] + long["insertions"]
    assert f"| > 30 s | 1 | {long['seconds']:.1f} | {100 * long['wer']:.1f} | 0/1 |" in printed


def test_evaluate_transcribes_a_long_recording_in_batched_chunks_as_transcribe_does(recording, tmp_path):
    model = whisper_rope.load_model("tiny.en", device="cpu")
    result = evaluate(model, recording / "data.jsonl", long_form="batched", batch_size=8, progress=False)
    short, long = result.rows
    assert (short.long_form, long.long_form, result.long_form) == (None, "batched", "batched")
    assert long.hypothesis == _transcribe_cli(recording, "8", tmp_path)
    assert long.wer < 0.2
    assert [bucket.bucket for bucket in result.buckets] == ["≤ 5 s", "> 30 s"]


def test_the_recipes_final_evaluation_gives_long_recordings_through_both_long_form_paths(recording, tmp_path):
    """Every bucket and both long-form paths for the source and the adapted model; with an end-of-text penalty, the
    source decoded with it too."""
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "rotary")).eval()
    model.configure(unpadded=True, eot_penalty=2.0)
    source = whisper_rope.save_checkpoint(
        randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper")), tmp_path / "source.pt"
    )
    config = FinetuneConfig(model=str(source), train="x", eval=str(recording / "data.jsonl"), batch_size=4)
    table = final_evaluation(SimpleNamespace(output=str(tmp_path), model=model), config, progress=False)
    lines = table.splitlines()
    start = lines.index("WER per clip length:")
    assert lines[start + 2].startswith(
        "| length | clips | seconds | source (30-s windows) WER % | source (30-s windows) capped | "
        "source, end-of-text penalty 2 (30-s windows) WER % |"
    )
    assert [line.split(" | ")[:2] for line in lines[start + 4 :]] == [["| ≤ 5 s", "1"], ["| > 30 s", "1"]] + [
        ["| > 30 s, batched", "1"]
    ]
    rows = json.loads((tmp_path / "final_evaluation.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["source", "source, end-of-text penalty 2", "fine-tuned"]
    for row in rows:
        assert [bucket["bucket"] for bucket in row["buckets"]] == ["≤ 5 s", "> 30 s", "> 30 s, batched"]
        assert row["clips"] == 2  # the batched pass is of the long recording alone, outside the main row
