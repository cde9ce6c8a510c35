"""No command deletes or overwrites a file it did not create, and none replaces its own input.

Each case runs the installed ``whisper-rope`` command as a user would and compares a fingerprint of every file
around it before and after: a refusal is one line and exit 2, and leaves every byte as it was. ``--force`` replaces
only what the command itself wrote. A run directory is locked while a fine-tune uses it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from . import default_sigint, subprocess_env
from .commands import (
    MANIFEST,
    SPEECH_DIMS,
    WHISPER_ROPE,
    checkpoint,
    command,
    fingerprint,
    one_error_line,
    save_model,
    write_manifest,
)  # fmt: skip

FINETUNE_FAST = ("--steps", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--warmup-steps", "0")


@pytest.fixture(scope="module")
def toy_pt(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("toy") / "toy.pt")


@pytest.fixture(scope="module")
def speech_pt(tmp_path_factory) -> Path:
    """A random whisper-variant model that fine-tunes on the speech fixtures in about a second per step."""
    return save_model(tmp_path_factory.mktemp("speech") / "speech.pt", dims=SPEECH_DIMS)


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


# ----------------------------------------------------------------------------------------------------------------
# convert


def test_convert_force_refuses_an_output_directory_that_holds_its_source(tmp_path, toy_pt):
    folder = tmp_path / "work"
    _copy(toy_pt, folder / "model.pt")
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("a run\n")
    before = fingerprint(tmp_path)
    done = command("convert", folder / "model.pt", folder, "--force")
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, str(folder))
    assert fingerprint(tmp_path) == before


def test_convert_force_refuses_an_output_directory_holding_foreign_files(tmp_path, toy_pt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("\\begin{document}\n")
    before = fingerprint(tmp_path)
    done = command("convert", toy_pt, out, "--force")
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "thesis.tex")
    assert fingerprint(tmp_path) == before


def test_convert_force_replaces_its_own_earlier_export(tmp_path, toy_pt):
    out = tmp_path / "out"
    assert command("convert", toy_pt, out).returncode == 0
    refused = command("convert", toy_pt, out)
    assert refused.returncode == 2
    one_error_line(refused.stderr, "--force")
    replaced = command("convert", toy_pt, out, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or set-aside directory left


def test_convert_force_refuses_to_replace_a_file_that_is_not_a_checkpoint(tmp_path, toy_pt):
    hf = tmp_path / "hf"
    assert command("convert", toy_pt, hf).returncode == 0
    target = tmp_path / "result.pt"
    target.write_text("not a checkpoint: the user's own file that happens to end in .pt\n")
    before = fingerprint(tmp_path)
    done = command("convert", hf, target, "--force")
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "result.pt")
    assert fingerprint(tmp_path) == before


def test_convert_force_replaces_an_earlier_converted_checkpoint(tmp_path, toy_pt):
    hf = tmp_path / "hf"
    assert command("convert", toy_pt, hf).returncode == 0
    target = tmp_path / "result.pt"
    assert command("convert", hf, target).returncode == 0
    again = command("convert", hf, target, "--force")
    assert again.returncode == 0, again.stderr
    assert set(checkpoint(target)) >= {"dims", "model_state_dict"}


def test_every_exported_file_is_readable_like_any_other_file(tmp_path, toy_pt):
    out = tmp_path / "out"
    assert command("convert", toy_pt, out).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ----------------------------------------------------------------------------------------------------------------
# finetune


def test_finetune_refuses_an_output_directory_that_holds_its_source(tmp_path, speech_pt):
    folder = tmp_path / "run"
    source = _copy(speech_pt, folder / "model.pt")
    before = fingerprint(tmp_path)
    done = command("finetune", "--model", source, "--output", folder, "--train", MANIFEST, *FINETUNE_FAST)
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, str(folder))
    assert fingerprint(tmp_path) == before


def test_finetune_refuses_an_output_directory_holding_files_it_did_not_write(tmp_path, speech_pt):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".draft.tmp").write_text("an editor's swap file\n")
    (out / ".step-0000001.partial").mkdir()
    (out / ".step-0000001.partial" / "data").write_text("someone else's staging\n")
    (out / "train_log.jsonl").write_text('{"event": "another tool"}\n')
    before = fingerprint(tmp_path)
    done = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, *FINETUNE_FAST)
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, str(out))
    assert fingerprint(tmp_path) == before


def test_finetune_into_a_new_directory_then_resume_still_works(tmp_path, speech_pt):
    out = tmp_path / "out"
    saving = ("--save-every", "1")
    first = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, *FINETUNE_FAST, *saving)
    assert first.returncode == 0, first.stderr
    same_again = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, *FINETUNE_FAST,
                         *saving)  # fmt: skip
    assert same_again.returncode == 0 and "already holds this run, finished at step 1" in same_again.stdout
    other_lr = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, *FINETUNE_FAST,
                       *saving, "--lr", "1e-3")  # fmt: skip
    assert other_lr.returncode == 2
    one_error_line(other_lr.stderr, "--resume")
    resumed = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, "--resume",
                      *FINETUNE_FAST[:-2], *saving, "--steps", "2")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "step-0000002").is_dir()


def test_a_second_finetune_into_a_running_output_directory_is_refused(tmp_path, speech_pt):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [str(WHISPER_ROPE), "finetune", "--model", str(speech_pt), "--output", str(out), "--train", str(MANIFEST),
         "--steps", "400", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        log = out / "train_log.jsonl"
        while not (log.is_file() and '"event": "train"' in log.read_text()):
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first run never logged a step"
            time.sleep(0.2)
        log_before = log.read_text()
        second = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, *FINETUNE_FAST)
        assert second.returncode == 2, second.stderr
        one_error_line(second.stderr, str(out))
        assert first.poll() is None, "the refused run stopped the first one"
        assert log.read_text().startswith(log_before), "the refused run touched the first one's log"
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130


# ----------------------------------------------------------------------------------------------------------------
# evaluate and compare


def test_evaluate_never_writes_over_its_own_manifest(tmp_path, speech_pt):
    manifest = write_manifest(tmp_path / "set.jsonl", [json.loads(line) for line in MANIFEST.read_text().splitlines()
                                                       if line.strip()][:1])  # fmt: skip
    manifest.write_text(manifest.read_text().replace('"audio": "', f'"audio": "{MANIFEST.parent}/'))
    before = fingerprint(tmp_path)
    done = command("evaluate", "--model", speech_pt, "--data", manifest, "--output", tmp_path / "set.json",
                   "--no-progress")  # fmt: skip
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "set.jsonl")
    assert fingerprint(tmp_path) == before


def test_compare_refuses_an_output_directory_holding_foreign_files(tmp_path, speech_pt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    before = fingerprint(tmp_path)
    done = command("compare", "--model", speech_pt, "--runs", "whisper", "--train", MANIFEST, "--eval",
                   f"set={MANIFEST}", "--steps", "1", "--output", out, "--no-progress")  # fmt: skip
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, str(out))
    assert fingerprint(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------
# transcribe


def test_transcribe_never_writes_over_a_transcript_it_did_not_write(tmp_path):
    from .commands import HELLO

    folder = tmp_path / "clips"
    _copy(HELLO, folder / "hello.flac")
    (folder / "hello.txt").write_text("hello world, typed by a person\n")
    model = save_model(tmp_path / "m.pt", dims=SPEECH_DIMS)
    before = fingerprint(folder)
    fast = ("--output_format", "txt", "--fp16", "False", "--verbose", "False", "--beam_size", "None",
            "--best_of", "None", "--temperature_increment_on_fallback", "None")  # fmt: skip
    done = command(folder / "hello.flac", "--model", model, "--output_dir", folder, *fast)
    assert done.returncode == 1, done.stderr
    one_error_line(done.stderr, "hello.txt")
    assert fingerprint(folder) == before
    # Its own output is replaced on the next run.
    out = tmp_path / "transcripts"
    assert command(folder / "hello.flac", "--model", model, "--output_dir", out, *fast).returncode == 0
    assert command(folder / "hello.flac", "--model", model, "--output_dir", out, *fast).returncode == 0
    assert (out / "hello.txt").is_file()


def test_finetune_refuses_the_output_directory_of_another_command(tmp_path, speech_pt):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / ".whisper-rope.lock").write_text('{"command": "compare", "pid": 1}')
    (out / "results.md").write_text("| run | WER |\n")
    before = fingerprint(tmp_path)
    done = command("finetune", "--model", speech_pt, "--output", out, "--train", MANIFEST, *FINETUNE_FAST)
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, str(out), "whisper-rope compare")
    assert fingerprint(tmp_path) == before


def test_a_finetune_that_fails_before_writing_leaves_no_output_directory(tmp_path):
    out = tmp_path / "run"
    done = command("finetune", "--model", tmp_path / "missing.pt", "--output", out, "--train", MANIFEST,
                   *FINETUNE_FAST)  # fmt: skip
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "missing.pt")
    assert list(tmp_path.iterdir()) == []
