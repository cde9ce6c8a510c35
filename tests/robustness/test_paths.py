"""Paths as people type them.

Every command runs from another working directory with relative paths, ``~`` (HOME is a temporary directory,
and no shell expands the ``~``: the command must), names with spaces and symlinks, in every path option, outputs
included. Nothing lands in a literal ``./~`` directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .commands import MANIFEST, SPEECH_DIMS, command, save_model

FAST_TRANSCRIBE = ("--output_format", "txt", "--fp16", "False", "--verbose", "False", "--beam_size", "None",
                   "--best_of", "None", "--temperature_increment_on_fallback", "None")  # fmt: skip
FAST_RUN = ("--steps", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--warmup-steps", "0")
SAVING = ("--save-every", "1")  # a step checkpoint to --resume from


@pytest.fixture
def user(tmp_path) -> dict:
    """HOME with a model (and a symlink to it) and a folder of two clips with transcripts; a working directory
    elsewhere holding a relative folder of clips whose name has a space."""
    home, cwd = tmp_path / "home", tmp_path / "work dir"
    model = save_model(home / "models" / "speech model.pt", dims=SPEECH_DIMS)
    os.symlink(model, home / "m.pt")
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()][:2]
    for folder in (home / "clips", cwd / "my data" / "audio"):
        folder.mkdir(parents=True)
        for row in rows:
            shutil.copy(MANIFEST.parent / row["audio"], folder / row["audio"])
            (folder / row["audio"]).with_suffix(".txt").write_text(row["text"] + "\n")
    (home / "clips.jsonl").write_text("".join(json.dumps({"audio": f"~/clips/{r['audio']}", "text": r["text"]}) + "\n"
                                              for r in rows))  # fmt: skip
    return {"home": home, "cwd": cwd, "clips": [r["audio"] for r in rows]}


def _no_literal_tilde(user: dict) -> None:
    assert not (user["cwd"] / "~").exists(), "an output went to a literal ./~ directory"
    assert not (user["home"] / "~").exists()


def test_finetune_takes_a_relative_folder_and_home_paths_everywhere(user):
    run = dict(cwd=user["cwd"], home=user["home"])
    first = command("finetune", "--model", "~/m.pt", "--train", "my data/audio", "--eval", "~/clips.jsonl",
                    "--output", "~/runs/first", *FAST_RUN, *SAVING, **run)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert (user["home"] / "runs" / "first" / "model.pt").is_file()
    resumed = command("finetune", "--model", "~/m.pt", "--train", "~/clips", "--resume", "~/runs/first",
                      "--output", "~/runs/first", *FAST_RUN[2:], "--steps", "2", *SAVING, **run)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (user["home"] / "runs" / "first" / "step-0000002").is_dir()
    _no_literal_tilde(user)


def test_evaluate_takes_a_relative_folder_and_writes_to_home(user):
    done = command("evaluate", "--model", "~/models/speech model.pt", "--data", "my data/audio", "--output",
                   "~/eval/result.json", "--no-progress", cwd=user["cwd"], home=user["home"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((user["home"] / "eval" / "result.json").read_text())
    assert summary["n_utterances"] == 2
    _no_literal_tilde(user)


def test_transcribe_takes_home_and_relative_inputs_and_outputs(user):
    first, second = user["clips"]
    done = command(f"~/clips/{first}", f"my data/audio/{second}", "--model", "~/m.pt", "--output_dir",
                   "~/transcripts", *FAST_TRANSCRIBE, cwd=user["cwd"], home=user["home"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (user["home"] / "transcripts").iterdir())
    assert written == sorted([".whisper-rope-outputs.json"] + [Path(c).with_suffix(".txt").name for c in user["clips"]])
    _no_literal_tilde(user)


def test_convert_takes_home_and_relative_paths(user):
    run = dict(cwd=user["cwd"], home=user["home"])
    exported = command("convert", "~/m.pt", "~/exports/hf model", **run)
    assert exported.returncode == 0, exported.stderr
    assert (user["home"] / "exports" / "hf model" / "model.safetensors").is_file()
    os.symlink(user["home"] / "exports" / "hf model", user["cwd"] / "hf link")
    back = command("convert", "hf link", "~/back.pt", **run)
    assert back.returncode == 0, back.stderr
    assert (user["home"] / "back.pt").is_file()
    _no_literal_tilde(user)


def test_compare_takes_home_paths_in_every_option(user):
    config = user["home"] / "compare.json"
    config.write_text(json.dumps({"eval": ["home=~/clips.jsonl"], "eval_batch_size": 2}))
    done = command("compare", "--config", "~/compare.json", "--model", "~/m.pt", "--runs", "whisper", "--train",
                   "my data/audio", "--output", "~/cmp", *FAST_RUN[:2], "--batch-size", "2", "--num-workers", "0",
                   "--no-progress", cwd=user["cwd"], home=user["home"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (user["home"] / "cmp" / "results.csv").is_file()
    _no_literal_tilde(user)


def test_every_path_option_expands_home_in_the_equals_form(monkeypatch, tmp_path):
    """``--option=~/x`` reaches the program unexpanded from every shell: each path option expands it itself."""
    from whisper_rope.cli.main import _normalise_argv, build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    cases = {
        ("transcribe", "~/a.flac", "--output_dir=~/out", "--model=~/m.pt", "--model_dir=~/cache"): {
            "audio": [f"{home}/a.flac"], "output_dir": f"{home}/out", "model": f"{home}/m.pt",
            "model_dir": f"{home}/cache"},
        ("convert", "~/m.pt", "~/hf"): {"src": f"{home}/m.pt", "dst": f"{home}/hf"},
        ("evaluate", "--model=~/m.pt", "--data=~/clips", "--output=~/r.json"): {
            "model": f"{home}/m.pt", "data": f"{home}/clips", "output": f"{home}/r.json"},
        ("finetune", "--model=~/m.pt", "--train=~/clips", "--eval=~/e.jsonl", "--output=~/run", "--resume=~/run",
         "--teacher-cache=~/t"): {
            "model": f"{home}/m.pt", "train": f"{home}/clips", "eval": f"{home}/e.jsonl", "output": f"{home}/run",
            "resume": f"{home}/run", "teacher_cache": f"{home}/t"},
        ("compare", "--train=~/clips", "--eval", "a=~/a.jsonl", "~/b.jsonl", "--output=~/cmp"): {
            "train": f"{home}/clips", "eval": [f"a={home}/a.jsonl", f"{home}/b.jsonl"], "output": f"{home}/cmp"},
    }  # fmt: skip
    for argv, expected in cases.items():
        args = vars(build_parser().parse_args(_normalise_argv(list(argv))))
        assert {name: args[name] for name in expected} == expected, argv


def test_a_config_file_s_home_paths_are_expanded(monkeypatch, tmp_path):
    """A config file is read by no shell: compare expands ``~`` in its path values (``eval`` as NAME=PATH)."""
    import json

    from whisper_rope.cli import build_parser
    from whisper_rope.cli.compare import config_from_args

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.json").write_text(json.dumps({"train": "~/clips", "eval": ["a=~/a.jsonl"], "output": "~/cmp"}))
    config = config_from_args(build_parser().parse_args(["compare", "--config", "~/c.json"]))
    assert (config.train, config.eval, config.output) == (f"{tmp_path}/clips", [f"a={tmp_path}/a.jsonl"],
                                                          f"{tmp_path}/cmp")  # fmt: skip


def test_a_relative_folder_gives_absolute_clip_paths_once_joined(user, monkeypatch):
    from whisper_rope.data import read_manifest

    monkeypatch.chdir(user["cwd"])
    manifest = read_manifest("my data/audio")
    assert [Path(e.audio) for e in manifest.examples] == sorted(user["cwd"] / "my data" / "audio" / c
                                                                for c in user["clips"])  # fmt: skip
    assert all(Path(e.audio).is_file() for e in manifest.examples)
