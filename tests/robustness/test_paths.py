"""Paths as people type them (issue 14, property 9).

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

from . import known_bug
from .commands import MANIFEST, SPEECH_DIMS, command, save_model

FAST_TRANSCRIBE = ("--output_format", "txt", "--fp16", "False", "--verbose", "False", "--beam_size", "None",
                   "--best_of", "None", "--temperature_increment_on_fallback", "None")  # fmt: skip
FAST_RUN = ("--steps", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--warmup-steps", "0")


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


@known_bug(
    "a relative folder given to --train was joined twice (my data/audio/my data/audio/x.flac: 'no usable "
    "rows'), and --output ~/x wrote into a literal ./~/x"
)
def test_finetune_takes_a_relative_folder_and_home_paths_everywhere(user):
    run = dict(cwd=user["cwd"], home=user["home"])
    first = command("finetune", "--model", "~/m.pt", "--train", "my data/audio", "--eval", "~/clips.jsonl",
                    "--output", "~/runs/first", *FAST_RUN, **run)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert (user["home"] / "runs" / "first" / "model.pt").is_file()
    resumed = command("finetune", "--model", "~/m.pt", "--train", "~/clips", "--resume", "~/runs/first",
                      "--output", "~/runs/first", *FAST_RUN[:-4], "--steps", "2", **run)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (user["home"] / "runs" / "first" / "step-0000002").is_dir()
    _no_literal_tilde(user)


@known_bug("a relative folder given to --data was joined twice, and --output ~/x wrote into a literal ./~/x")
def test_evaluate_takes_a_relative_folder_and_writes_to_home(user):
    done = command("evaluate", "--model", "~/models/speech model.pt", "--data", "my data/audio", "--output",
                   "~/eval/result.json", "--no-progress", cwd=user["cwd"], home=user["home"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((user["home"] / "eval" / "result.json").read_text())
    assert summary["n_utterances"] == 2
    _no_literal_tilde(user)


@known_bug("audio inputs and --output_dir given as ~/x were not expanded")
def test_transcribe_takes_home_and_relative_inputs_and_outputs(user):
    first, second = user["clips"]
    done = command(f"~/clips/{first}", f"my data/audio/{second}", "--model", "~/m.pt", "--output_dir",
                   "~/transcripts", *FAST_TRANSCRIBE, cwd=user["cwd"], home=user["home"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (user["home"] / "transcripts").iterdir())
    assert written == sorted(Path(c).with_suffix(".txt").name for c in user["clips"])
    _no_literal_tilde(user)


@known_bug("convert did not expand ~ in SRC or DST")
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


@known_bug(
    "compare did not expand ~ in --output or in NAME=~/manifest, and a relative folder of clips as --train "
    "was joined twice"
)
def test_compare_takes_home_paths_in_every_option(user):
    config = user["home"] / "compare.json"
    config.write_text(json.dumps({"eval": ["home=~/clips.jsonl"], "eval_batch_size": 2}))
    done = command("compare", "--config", "~/compare.json", "--model", "~/m.pt", "--runs", "whisper", "--train",
                   "my data/audio", "--output", "~/cmp", *FAST_RUN[:2], "--batch-size", "2", "--num-workers", "0",
                   "--no-progress", cwd=user["cwd"], home=user["home"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (user["home"] / "cmp" / "results.csv").is_file()
    _no_literal_tilde(user)
