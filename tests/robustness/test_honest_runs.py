"""Honest resume and compare.

A resumed fine-tune applies changed optimizer settings and records when they changed (or refuses them); ``compare``
keys every stored result by the settings that produced it, so a re-run with other settings trains and evaluates
again instead of reporting old numbers under new headers; nothing is written before the inputs are validated.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from .commands import MANIFEST, SPEECH_DIMS, command, fingerprint, one_error_line, save_model, write_manifest

RUN = ("--batch-size", "2", "--num-workers", "0", "--no-progress", "--warmup-steps", "0", "--save-every", "1",
       "--log-every", "1")  # fmt: skip


@pytest.fixture(scope="module")
def speech_pt(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("speech") / "speech.pt", dims=SPEECH_DIMS)


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory) -> Path:
    """A two-row manifest (absolute audio paths) that evaluates in a few seconds."""
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()][:2]
    for row in rows:
        row["audio"] = str(MANIFEST.parent / row["audio"])
    return write_manifest(tmp_path_factory.mktemp("clips") / "two.jsonl", rows)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _train_records(output: Path) -> list:
    lines = (output / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "train"]


def test_resume_applies_a_changed_learning_rate_and_weight_decay_and_records_when(tmp_path, speech_pt, two_clips):
    out = tmp_path / "run"
    first = command("finetune", "--model", speech_pt, "--train", two_clips, "--output", out, "--steps", "1",
                    "--lr", "1e-4", "--weight-decay", "0.01", *RUN)  # fmt: skip
    assert first.returncode == 0, first.stderr
    resumed = command("finetune", "--model", speech_pt, "--train", two_clips, "--output", out, "--steps", "2",
                      "--resume", "--lr", "1e-3", "--weight-decay", "0.5", *RUN)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    state = _state(out / "step-0000002" / "training_state.pt")
    groups = state["optimizer"]["param_groups"]
    # build_optimizer orders its groups (biases and norms, no decay), (matrices, decay)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.5]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-3]
    assert state["scheduler"]["base_lrs"] == [1e-3, 1e-3]
    assert (state["config"]["lr"], state["config"]["weight_decay"]) == (1e-3, 0.5)
    assert state["settings_history"] == [{"step": 1, "changed": {"lr": [1e-4, 1e-3], "weight_decay": [0.01, 0.5]}}]
    # Step 2 of 2 without warm-up sits at half the cosine: the new peak rate times 0.5.
    lr_used = {r["step"]: r["lr"] for r in _train_records(out)}
    assert lr_used[1] == pytest.approx(1e-4)
    assert lr_used[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert "applied from step 1" in resumed.stderr


# ----------------------------------------------------------------------------------------------------------------
# compare


def _compare(speech_pt: Path, out: Path, *options: str):
    return command("compare", "--model", speech_pt, "--runs", "whisper", "--lr", "1e-4", "--batch-size", "2",
                   "--warmup-steps", "0", "--num-workers", "0", "--eval-batch-size", "2", "--no-progress",
                   "--output", out, *options)  # fmt: skip


def _csv_rows(out: Path) -> list:
    with open(out / "results.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_compare_rerun_with_other_settings_trains_again_and_reports_only_their_results(tmp_path, speech_pt, two_clips):
    out = tmp_path / "cmp"
    first = _compare(speech_pt, out, "--train", two_clips, "--eval", f"a={two_clips}", "--steps", "1")
    assert first.returncode == 0, first.stderr
    assert {row["steps"] for row in _csv_rows(out) if row["seed"]} == {"1"}

    second = _compare(speech_pt, out, "--train", two_clips, "--eval", f"a={two_clips}", "--steps", "2")
    assert second.returncode == 0, second.stderr
    assert {row["steps"] for row in _csv_rows(out) if row["seed"]} == {"2"}
    assert "2 steps" in (out / "results.md").read_text()
    results = sorted(out.glob("runs/*/result.json"))
    assert len(results) == 2, results  # the 1-step result is kept, keyed by its own settings
    assert sorted(json.loads(p.read_text())["steps"] for p in results) == [1, 2]

    renamed = _compare(speech_pt, out, "--train", two_clips, "--eval", f"b={two_clips}", "--steps", "2")
    assert renamed.returncode == 0, renamed.stderr
    assert {row["set"] for row in _csv_rows(out)} == {"b"}
    assert len(sorted(out.glob("runs/*/result.json"))) == 2  # evaluated again, not trained again


def test_compare_writes_nothing_before_its_inputs_are_validated(tmp_path, speech_pt, two_clips):
    out = tmp_path / "cmp"
    done = _compare(speech_pt, out, "--train", two_clips, "--eval", f"a={tmp_path / 'missing.jsonl'}", "--steps", "1")
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "missing.jsonl")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = fingerprint(out)
    done = _compare(speech_pt, out, "--train", tmp_path / "nothing.jsonl", "--eval", f"a={two_clips}", "--steps", "1")
    assert done.returncode == 2
    assert fingerprint(out) == before


@pytest.mark.parametrize("option, first, second", [("--seed", "0", "1"), ("--batch-size", "2", "1")])
def test_resume_refuses_a_changed_setting_it_cannot_apply(tmp_path, speech_pt, two_clips, option, first, second):
    """The random states and the sampler's position come from the checkpoint: a new seed or batch size would be
    recorded as applied while the run went on with the old ones."""
    out = tmp_path / "run"
    base = list(RUN)
    if option == "--batch-size":  # RUN's own --batch-size 2 would follow and win
        at = base.index("--batch-size")
        del base[at : at + 2]
    run = command("finetune", "--model", speech_pt, "--train", two_clips, "--output", out, "--steps", "1",
                  option, first, *base)  # fmt: skip
    assert run.returncode == 0, run.stderr
    resumed = command("finetune", "--model", speech_pt, "--train", two_clips, "--output", out, "--steps", "2",
                      "--resume", option, second, *base)  # fmt: skip
    assert resumed.returncode == 2
    one_error_line(resumed.stderr, "cannot resume from", f"{option} {second}", "start a new run")
    assert not (out / "step-0000002").exists()
