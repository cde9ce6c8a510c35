"""`whisper-rope compare`: before row, runs, reports, plots, and resuming without redoing finished runs."""

import csv
import json
import re

import pytest

import whisper_rope
from tests.conftest import FIXTURES, randomise_, small_dims
from whisper_rope import cli
from whisper_rope.experiments.compare import CompareConfig, RunSpec, compare

SPEECH = FIXTURES / "speech" / "manifest.jsonl"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper"))
    return whisper_rope.save_checkpoint(model, tmp_path_factory.mktemp("src") / "source.pt")


def test_run_specs():
    assert RunSpec.parse("rotary@distill") == RunSpec("rotary", distill=True)
    assert RunSpec.parse("rotary@transplant,distill").slug == "rotary_rotary-distill-transplant"
    assert RunSpec.parse("rotary/learned-sinusoidal").label == "rotary/learned-sinusoidal"
    spec = RunSpec.parse("rotary@transplant,distill,unpadded")
    assert spec.unpadded and spec.label == "rotary (distill, transplant, unpadded)"
    with pytest.raises(ValueError, match="unpadded flag belongs to transplant runs"):
        RunSpec.parse("rotary@unpadded")
    with pytest.raises(ValueError, match="unknown flag 'fast'"):
        RunSpec.parse("rotary@fast")
    with pytest.raises(ValueError, match="invalid encoder scheme"):
        RunSpec.parse("rope/rope@distill")


def test_compare_writes_reports_and_resumes(source, tmp_path, monkeypatch):
    output = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(source),
        "--runs",
        "whisper",
        "rotary",
        "--train",
        str(SPEECH),
        "--eval",
        f"fixtures={SPEECH}",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--warmup-steps",
        "0",
        "--seeds",
        "0",
        "1",
        "--num-workers",
        "0",
        "--no-progress",
        "--output",
        str(output),
    ]
    assert cli.main(args) == 0
    runs = sorted(p.name for p in (output / "runs").iterdir())
    assert [name.rsplit("-", 1)[0] for name in runs] == [
        "rotary_rotary-seed0",
        "rotary_rotary-seed1",
        "sinusoidal_learned-seed0",
        "sinusoidal_learned-seed1",
    ]
    assert all(re.fullmatch(r"[0-9a-f]{10}", name.rsplit("-", 1)[1]) for name in runs)  # the settings' key
    rows = list(csv.DictReader(open(output / "results.csv")))
    # before: padded only; whisper: padded; rotary (no encoder table): padded and unpadded. Two seeds each.
    assert [(r["run"], r["decoding"]) for r in rows].count(("rotary", "unpadded")) == 2
    assert len(rows) == 1 + 2 * 1 + 2 * 2
    assert all(0 <= float(r["wer"]) for r in rows)
    table = (output / "results.md").read_text()
    assert "| before (source model) | padded |" in table and " ± " in table
    assert "WER per clip length on `fixtures`:" in table and "| ≤ 5 s | 8 | " in table  # the fixtures: 2-4 s each
    for name in ("wer_per_set.png", "loss_curves.png", "cost.png"):
        assert (output / name).stat().st_size > 1000

    # A second invocation with the same settings finds every run finished: nothing is trained or evaluated again.
    import whisper_rope.experiments.compare as compare_module

    def no_training(*_, **__):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "run_one", no_training)
    monkeypatch.setattr(compare_module, "evaluate", no_training)
    result = compare(
        CompareConfig(
            model=str(source),
            runs=["whisper", "rotary"],
            train=str(SPEECH),
            eval=[f"fixtures={SPEECH}"],
            steps=2,
            batch_size=2,
            warmup_steps=0,
            seeds=[0, 1],
            output=str(output),
            progress=False,
        )
    )
    assert len(result["runs"]) == 4
    assert json.loads((output / "runs" / runs[1] / "result.json").read_text())["seed"] == 1
