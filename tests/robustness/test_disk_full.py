"""A full disk or a read-only directory while writing checkpoints, conversions and transcripts.

The tests run as root, where permissions do not stop writes, and cannot mount a small filesystem, so the failures
are made three ways: the kernel's file-size limit (``RLIMIT_FSIZE``: writes past it fail with EFBIG, a real failed
``write(2)``), a write that runs out of space part-way (ENOSPC from a replaced file object) or cannot create its
file at all (EROFS), and ``/dev/full`` (every write fails with ENOSPC). Each must give one clear error line and
leave the previous file intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import types
from pathlib import Path

import pytest
import torch

import whisper_rope
import whisper_rope.fs.atomic
from tests.convert_helpers import SMALL_DIMS, write_model

from . import (
    REPO,
    SPEECH,
    assert_one_line_error,
    random_model,  # noqa: F401  (a pytest fixture, requested by name)
    run_cli,
    transcribe,
)

HELLO = REPO / "tests" / "fixtures" / "hello.flac"


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes in any file fail with EFBIG (Python ignores SIGXFSZ) until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


class FillingFile:
    """A file object on a disk with ``room`` bytes left: the write that crosses it stores what fits and fails with
    ENOSPC, and so does every later write or flush, as on a really full disk."""

    def __init__(self, inner, room: int):
        self.inner = inner
        self.room = room
        self.full = False

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self.full or len(data) > self.room:
            self.inner.write(data[: 0 if self.full else self.room])
            self.full, self.room = True, 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            self.inner.close()


def _atomic_os(monkeypatch, **overrides) -> None:
    """Give whisper_rope.fs.atomic its own ``os`` with some functions replaced (the real ``os`` is untouched)."""
    proxy = types.SimpleNamespace(**vars(os))
    for name, replacement in overrides.items():
        setattr(proxy, name, replacement)
    monkeypatch.setattr(whisper_rope.fs.atomic, "os", proxy)


def disk_fills_after(monkeypatch, room: int) -> None:
    _atomic_os(monkeypatch, fdopen=lambda fd, mode: FillingFile(os.fdopen(fd, mode), room))


def directory_is_read_only(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(kwargs.get("dir", "")))

    monkeypatch.setattr(whisper_rope.fs.atomic.tempfile, "mkstemp", refuse)


@pytest.fixture
def previous(tmp_path) -> Path:
    """A saved checkpoint that a failed save must leave byte for byte as it was."""
    torch.manual_seed(0)
    return whisper_rope.save_checkpoint(whisper_rope.build_model(SMALL_DIMS, "whisper"), tmp_path / "model.pt")


def _assert_intact(path: Path, content: bytes) -> None:
    assert path.read_bytes() == content
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    whisper_rope.load_model(path, device="cpu")


@pytest.mark.parametrize(
    "failure", ["kernel file-size limit (EFBIG)", "disk fills mid-write (ENOSPC)", "read-only directory (EROFS)"]
)
def test_a_failed_checkpoint_save_raises_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, previous, failure):
    content = previous.read_bytes()
    model = whisper_rope.build_model(SMALL_DIMS, "whisper")
    with contextlib.ExitStack() as stack:
        if failure.startswith("kernel"):
            stack.enter_context(file_size_limit(len(content) // 2))
        elif failure.startswith("disk"):
            disk_fills_after(monkeypatch, len(content) // 2)
        else:
            directory_is_read_only(monkeypatch)
        # torch.save reports a failed write as a RuntimeError; atomic_write turns it into an OSError naming the file
        with pytest.raises((OSError, RuntimeError)) as failed:
            whisper_rope.save_checkpoint(model, previous)
    assert str(failed.value).strip() and "\n" not in str(failed.value).strip()
    _assert_intact(previous, content)


def test_a_checkpoint_save_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch, previous):
    disk_fills_after(monkeypatch, previous.stat().st_size // 2)
    with pytest.raises(OSError) as failed:
        whisper_rope.save_checkpoint(whisper_rope.build_model(SMALL_DIMS, "whisper"), previous)
    assert failed.value.errno == errno.ENOSPC


def _snapshot(destination: Path) -> dict:
    return {p.name: p.read_bytes() for p in ([destination] if destination.is_file() else destination.iterdir())}


def _convert_twice(source: Path, destination: Path, capsys) -> tuple[dict, int, str]:
    """Convert once normally, then again with --force past the file-size limit; (first output, status, stderr)."""
    assert run_cli("convert", source, destination, "--no-progress") == 0
    before = _snapshot(destination)
    capsys.readouterr()
    with file_size_limit(4096):
        status = run_cli("convert", source, destination, "--force", "--no-progress")
    return before, status, capsys.readouterr().err


def test_convert_on_a_full_disk_exits_2_with_one_line_and_keeps_the_previous_output(tmp_path, capsys):
    write_model(tmp_path / "ct2")
    destination = tmp_path / "converted.pt"
    before, status, err = _convert_twice(tmp_path / "ct2", destination, capsys)
    assert status == 2
    assert_one_line_error(err)
    assert _snapshot(destination) == before
    assert not [p.name for p in destination.parent.iterdir() if p.name.startswith(".")]


def test_export_to_hugging_face_on_a_full_disk_exits_2_with_one_line(tmp_path, capsys, previous):
    destination = tmp_path / "hf"
    try:
        before, status, err = _convert_twice(previous, destination, capsys)
    finally:
        assert not [p.name for p in destination.parent.iterdir() if p.name.startswith(".")]
    assert _snapshot(destination) == before
    assert status == 2
    assert_one_line_error(err)


def test_convert_on_a_full_disk_names_the_file_and_the_cause(tmp_path, capsys):
    write_model(tmp_path / "ct2")
    _, _, err = _convert_twice(tmp_path / "ct2", tmp_path / "converted.pt", capsys)
    line = assert_one_line_error(err, "converted.pt")
    assert "File too large" in line or "No space left" in line


def test_a_transcript_written_to_a_full_device_fails_that_file_only(tmp_path, capsys, monkeypatch, random_model):
    """The disk is full while ``out/first.txt`` is written: every write to its temporary file fails with ENOSPC. (A
    link placed at ``out/first.txt`` would be something transcribe did not write, which it refuses to replace: the
    temporary file's writes are made to fail instead.)"""
    output = tmp_path / "out"
    output.mkdir()
    first, second = tmp_path / "first.flac", tmp_path / "second.flac"
    for path in (first, second):
        path.write_bytes(HELLO.read_bytes())

    def full_for_first(fd, mode):
        handle = os.fdopen(fd, mode)
        temporary = os.readlink(f"/proc/self/fd/{fd}")
        return FillingFile(handle, 0) if temporary.startswith(f"{output}/.first.txt.") else handle

    _atomic_os(monkeypatch, fdopen=full_for_first)
    assert transcribe(random_model, [first, second], output) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("whisper-rope:")]
    assert errors[0].startswith(f"whisper-rope: error: {first}: ") and "No space left on device" in errors[0]
    assert errors[1:] == ["whisper-rope: 1 of 2 files failed"]
    assert (output / "second.txt").is_file()


def test_an_output_directory_that_is_a_file_exits_2_with_one_line(tmp_path, capsys, random_model):
    not_a_directory = tmp_path / "taken"
    not_a_directory.write_text("a file where the output directory should go\n")
    assert transcribe(random_model, [HELLO], not_a_directory) == 2
    assert_one_line_error(capsys.readouterr().err, "taken")
    assert not_a_directory.read_text().startswith("a file")


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning: the disk fills while a step checkpoint is written


def test_a_full_disk_at_a_training_checkpoint_stops_with_one_line_keeps_the_last_one_and_resumes_exactly(
    tmp_path, monkeypatch, capsys
):
    from whisper_rope.training.state import MODEL_FILE, latest_checkpoint
    from whisper_rope.weights.format import read_checkpoint

    from ..conftest import small_dims

    torch.manual_seed(0)
    source = whisper_rope.save_checkpoint(whisper_rope.build_model(small_dims(), "rotary"), tmp_path / "source.pt")
    common = [
        "--model",
        str(source),
        "--train",
        str(SPEECH / "manifest.jsonl"),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--save-every",
        "1",
        "--keep-last",
        "5",
        "--num-workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    assert run_cli("finetune", *common, "--output", tmp_path / "straight") == 0

    opened = []

    def fill_from_the_third_file(fd, mode):  # step 1's model.pt and training_state.pt fit; step 2's do not
        opened.append(fd)
        return FillingFile(os.fdopen(fd, mode), 1 << 20 if len(opened) > 2 else 1 << 40)

    _atomic_os(monkeypatch, fdopen=fill_from_the_third_file)
    output = tmp_path / "run"
    assert run_cli("finetune", *common, "--output", output) == 2
    assert_one_line_error(capsys.readouterr().err)
    assert latest_checkpoint(output).name == "step-0000001" and not (output / "step-0000002").exists()
    whisper_rope.load_model(output / "step-0000001" / MODEL_FILE, device="cpu")

    monkeypatch.undo()  # space freed
    assert run_cli("finetune", *common, "--output", output, "--resume") == 0
    assert not list(output.glob(".step-*"))
    expected = read_checkpoint(tmp_path / "straight" / MODEL_FILE)["model_state_dict"]
    resumed = read_checkpoint(output / MODEL_FILE)["model_state_dict"]
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
