"""Which files a command may write: evaluate claims its two files, no
output is written through a link the program did not make, inputs whose transcripts would collide are refused,
the transcript record has one rule per failure, a failing record write ends no batch, and files follow the umask.

Commands run in this process (``run_cli``) on a small random model; a refusal "before the model loads" is checked by
counting calls of `LoadOptions.load`. Faults the tests cannot make as root (a read-only folder, a full disk) are
made as in ``test_disk_full.py``: by replacing the function that creates or renames the temporary file.
"""

from __future__ import annotations

import errno
import json
import os
import types
from pathlib import Path

import pytest

import whisper_rope
import whisper_rope.fs.atomic
from whisper_rope.fs.atomic import atomic_write_text
from whisper_rope.fs.outputs import LOCK_FILE, OutputError, claim_directory
from whisper_rope.training.log import TrainingLog
from whisper_rope.weights.loading import LoadOptions

from . import (
    SPEECH,
    assert_one_line_error,
    random_model,  # noqa: F401  (a pytest fixture, requested by name)
    run_cli,
    time_limit,
    transcribe,
)
from .commands import HELLO, fingerprint, write_manifest

RECORD = ".whisper-rope-outputs.json"


@pytest.fixture
def loads(monkeypatch) -> list:
    """The models `LoadOptions.load` was asked for during the test (it still loads them)."""
    calls = []
    load = LoadOptions.load

    def counted(self, name, *args, **kwargs):
        calls.append(name)
        return load(self, name, *args, **kwargs)

    monkeypatch.setattr(LoadOptions, "load", counted)
    return calls


def _clip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HELLO.read_bytes())
    return path


def _errors(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("whisper-rope:")]


def _one_row_manifest(folder: Path) -> Path:
    row = json.loads((SPEECH / "manifest.jsonl").read_text().splitlines()[0])
    folder.mkdir()
    return write_manifest(folder / "test.jsonl", [{**row, "audio": str(SPEECH / row["audio"])}])


def _evaluate(model: Path, data: Path, output: Path) -> int:
    return run_cli("evaluate", "--model", model, "--data", data, "--output", output, "--no-progress", "--fp16", "False")


# ----------------------------------------------------------------------------------------------------------------
# `evaluate` claims X.json and X.jsonl


@pytest.mark.parametrize("existing", ["train.jsonl", "train.json"])
def test_evaluate_refuses_to_replace_a_file_it_did_not_write(tmp_path, capsys, loads, random_model, existing):
    data = _one_row_manifest(tmp_path / "data")
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / existing).write_text('{"audio": "a.flac", "text": "the user\'s training manifest"}\n')
    before = fingerprint(tmp_path)
    assert _evaluate(random_model, data, mine / "train.json") == 2
    assert_one_line_error(capsys.readouterr().err, existing)
    assert fingerprint(tmp_path) == before
    assert loads == []


def test_evaluate_replaces_its_own_earlier_output(tmp_path, capsys, random_model):
    data = _one_row_manifest(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    assert _evaluate(random_model, data, out / "scores.json") == 0
    first = json.loads((out / "scores.json").read_text())
    assert _evaluate(random_model, data, out / "scores.json") == 0, capsys.readouterr().err
    assert json.loads((out / "scores.json").read_text())["n_utterances"] == first["n_utterances"] == 1
    assert len((out / "scores.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "scores.json", "scores.jsonl"]


def test_an_evaluation_cut_short_by_a_full_disk_is_replaced_by_the_next_one(tmp_path, capsys, monkeypatch,
                                                                             random_model):  # fmt: skip
    """The summary is written, the rows are not (ENOSPC): the summary is recorded as evaluate's, so that the next
    run replaces it instead of refusing it as a file it did not write."""

    def replace(source, target):
        if Path(target).name == "scores.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.replace(source, target)

    data = _one_row_manifest(tmp_path / "data")
    out = tmp_path / "out"
    _atomic_os(monkeypatch, replace=replace)
    assert _evaluate(random_model, data, out / "scores.json") == 2
    assert "No space left on device" in _errors(capsys.readouterr().err)[-1]
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "scores.json"]
    monkeypatch.undo()  # space freed
    assert _evaluate(random_model, data, out / "scores.json") == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "scores.json", "scores.jsonl"]


# ----------------------------------------------------------------------------------------------------------------
# Never through a link


@pytest.mark.parametrize("target_exists", [False, True], ids=["dangling", "to a file"])
def test_transcribe_never_writes_through_a_symlink_at_an_output_name(tmp_path, capsys, random_model, target_exists):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "planted.txt"
    if target_exists:
        target.write_text("someone else's file\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "hello.txt").symlink_to(target)
    second = _clip(tmp_path / "clips" / "second.flac")
    assert transcribe(random_model, [HELLO, second], out) == 1
    errors = _errors(capsys.readouterr().err)
    assert errors[0].startswith(f"whisper-rope: error: {HELLO}: ") and "hello.txt" in errors[0] and "link" in errors[0]
    assert errors[1:] == ["whisper-rope: 1 of 2 files failed"]
    assert os.readlink(out / "hello.txt") == str(target)
    assert sorted(p.name for p in elsewhere.iterdir()) == (["planted.txt"] if target_exists else [])
    if target_exists:
        assert target.read_text() == "someone else's file\n"
    assert (out / "second.txt").is_file() and not (out / "second.txt").is_symlink()


def test_evaluate_never_writes_through_a_symlink_at_its_output(tmp_path, capsys, loads, random_model):
    data = _one_row_manifest(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    before = fingerprint(tmp_path)
    assert _evaluate(random_model, data, out / "scores.json") == 2
    assert_one_line_error(capsys.readouterr().err, "scores.jsonl", "link")
    assert fingerprint(tmp_path) == before and not (tmp_path / "elsewhere.jsonl").exists()
    assert loads == []


def _owns(name: str) -> bool:
    return name in ("model.pt", "train_log.jsonl") or name.startswith("step-")


@pytest.mark.parametrize("link", [LOCK_FILE, "train_log.jsonl", "step-0000001/model.pt"])
def test_a_claimed_directory_holding_a_symlink_is_refused(tmp_path, link):
    """The lock file, a file the command appends to, and a file inside one of its step directories: a run directory
    (marked by an earlier run of the command) holding a link to elsewhere is refused, the link's target untouched."""
    out = tmp_path / "run"
    (out / "step-0000001").mkdir(parents=True)
    if link != LOCK_FILE:
        (out / LOCK_FILE).write_text('{"command": "finetune", "pid": 1}')
    (out / link).symlink_to(tmp_path / "planted")
    before = fingerprint(tmp_path)
    with pytest.raises(OutputError, match="link") as refused:
        claim_directory(out, "finetune", "--output", _owns, adopt_unmarked=True)
    assert link in str(refused.value)
    assert fingerprint(tmp_path) == before and not (tmp_path / "planted").exists()


def test_the_training_log_is_never_appended_through_a_link(tmp_path):
    target = tmp_path / "planted.jsonl"
    target.write_text("someone else's lines\n")
    (tmp_path / "train_log.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        TrainingLog(tmp_path / "train_log.jsonl").write({"event": "train", "step": 1})
    assert target.read_text() == "someone else's lines\n"


def test_an_atomic_write_replaces_a_link_at_its_name_and_never_follows_it(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("left alone\n")
    (tmp_path / "cache.json").symlink_to(target)
    atomic_write_text(tmp_path / "cache.json", "new\n")
    assert not (tmp_path / "cache.json").is_symlink() and (tmp_path / "cache.json").read_text() == "new\n"
    assert target.read_text() == "left alone\n"


# ----------------------------------------------------------------------------------------------------------------
# Inputs whose transcripts would collide


def test_inputs_whose_transcripts_would_collide_are_refused_before_the_model_loads(tmp_path, capsys, loads,
                                                                                   random_model):  # fmt: skip
    first, second = _clip(tmp_path / "x" / "clip.flac"), _clip(tmp_path / "y" / "clip.flac")
    out = tmp_path / "out"
    assert transcribe(random_model, [first, second], out) == 2
    assert_one_line_error(capsys.readouterr().err, str(first), str(second), str(out / "clip.txt"))
    assert not out.exists() and loads == []


# ----------------------------------------------------------------------------------------------------------------
# The transcript record


def _listing(root: Path) -> dict:
    """Every entry under ``root`` -> its kind and content (a FIFO is listed, never opened)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            found[str(path)] = path.read_bytes()
        else:
            found[str(path)] = "dir" if path.is_dir() else "other"
    return found


def _make_record(out: Path, kind: str, tmp_path: Path) -> None:
    record = out / RECORD
    if kind == "a directory":
        record.mkdir()
        (record / "inside").write_text("x")
    elif kind == "a dangling link":
        record.symlink_to(tmp_path / "planted.json")
    elif kind == "a link to a record":
        (tmp_path / "planted.json").write_text("{}")
        record.symlink_to(tmp_path / "planted.json")
    elif kind == "a FIFO":
        os.mkfifo(record)


@pytest.mark.parametrize("kind", ["a directory", "a dangling link", "a link to a record", "a FIFO"])
def test_a_record_that_is_no_regular_file_stops_the_run_before_the_model_loads(tmp_path, capsys, loads,
                                                                               random_model, kind):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    _make_record(out, kind, tmp_path)
    second = _clip(tmp_path / "second.flac")
    before = _listing(tmp_path)
    with time_limit(60):  # a FIFO opened for reading waits for a writer
        assert transcribe(random_model, [HELLO, second], out) == 2
    assert_one_line_error(capsys.readouterr().err, RECORD)
    assert _listing(tmp_path) == before
    assert loads == []


@pytest.mark.parametrize("damage", ["{", "[1, 2]", '{"hello.txt": "mine"}', "\udcff"], ids=["cut", "list", "values",
                                                                                            "not utf-8"])  # fmt: skip
def test_a_damaged_record_warns_once_and_every_existing_output_counts_as_foreign(tmp_path, capsys, recwarn,
                                                                                 random_model, damage):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD).write_bytes(damage.encode("utf-8", "surrogateescape"))
    (out / "hello.txt").write_text("hello world, typed by a person\n")
    second = _clip(tmp_path / "second.flac")
    assert transcribe(random_model, [HELLO, second], out) == 1
    lines = _errors(capsys.readouterr().err)
    warned = [str(warning.message) for warning in recwarn if RECORD in str(warning.message)]  # one line each on the CLI
    assert len(warned) == 1 and "damaged" in warned[0], [str(warning.message) for warning in recwarn]
    assert any(line.startswith(f"whisper-rope: error: {HELLO}: ") and "hello.txt" in line for line in lines), lines
    assert (out / "hello.txt").read_text() == "hello world, typed by a person\n"
    assert set(json.loads((out / RECORD).read_text())) == {"second.txt"}


# ----------------------------------------------------------------------------------------------------------------
# A failing record write, an output folder that cannot be written


def _atomic_os(monkeypatch, **overrides) -> None:
    proxy = types.SimpleNamespace(**vars(os))
    for name, replacement in overrides.items():
        setattr(proxy, name, replacement)
    monkeypatch.setattr(whisper_rope.fs.atomic, "os", proxy)


def test_a_failing_record_write_fails_that_file_and_the_batch_goes_on(tmp_path, capsys, monkeypatch, random_model):
    failed = []

    def replace(source, target):
        if Path(target).name == RECORD and not failed:  # the disk is full when the first record is saved
            failed.append(target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.replace(source, target)

    _atomic_os(monkeypatch, replace=replace)
    out = tmp_path / "out"
    second, third = _clip(tmp_path / "second.flac"), _clip(tmp_path / "third.flac")
    assert transcribe(random_model, [HELLO, second, third], out) == 1
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 2 and RECORD in errors[0] and "No space left on device" in errors[0], errors
    assert errors[1] == "whisper-rope: 1 of 3 files failed"
    assert failed and {"hello.txt", "second.txt", "third.txt"} <= {p.name for p in out.iterdir()}
    assert set(json.loads((out / RECORD).read_text())) == {"second.txt", "third.txt"}


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to be created"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch, loads, random_model, exists
):
    out = tmp_path / "read-only"
    out.mkdir()
    create = whisper_rope.fs.atomic.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return create(*args, dir=dir, **kwargs)

    monkeypatch.setattr(whisper_rope.fs.atomic.tempfile, "mkstemp", read_only)
    target = out if exists else out / "transcripts"
    assert transcribe(random_model, [HELLO], target) == 2
    assert_one_line_error(capsys.readouterr().err, str(target), "Read-only file system")
    assert list(out.iterdir()) == [] and loads == []


# ----------------------------------------------------------------------------------------------------------------
# The umask


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_files_are_created_with_the_users_umask(tmp_path, umask):
    from .commands import save_model

    previous = os.umask(umask)
    try:
        checkpoint = save_model(tmp_path / "model.pt")
        exported = tmp_path / "hf"
        assert run_cli("convert", checkpoint, exported) == 0
        text = atomic_write_text(tmp_path / "entry.json", "{}")
        claim = claim_directory(tmp_path / "run", "finetune", "--output", _owns)
        TrainingLog(tmp_path / "run" / "train_log.jsonl").write({"event": "train", "step": 1})
        claim.release()
    finally:
        os.umask(previous)
    files = [checkpoint, text, *exported.iterdir(), tmp_path / "run" / LOCK_FILE, tmp_path / "run" / "train_log.jsonl"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
