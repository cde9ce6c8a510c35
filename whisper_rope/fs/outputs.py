"""What a command may write: never a file it did not create, never its own input, never a directory another run is
using, never through a link it did not make (docs/reliability.md, "Outputs").

* `refuse_overlap` stops a command whose output is, or would hold, one of its inputs.
* `claim_directory` adopts an output directory for one command (new, empty, or marked by an earlier run of the same
  command) and holds an exclusive lock on it (`filelock`: ``flock`` on POSIX, a byte-range lock on Windows) until
  `DirectoryClaim.release` or the process ends; a directory of someone else's files, one holding a symlink anywhere
  inside, or one another process is using, is refused in one line.
* `temporary_of` recognises the temporary files of our own atomic writes, so that a command sweeps only those.
* `OutputRecord` remembers which files ``transcribe`` and ``evaluate`` wrote into a folder, so that a later run
  replaces its own and never a file a person put there (a reference ``clip.txt`` beside ``clip.flac``, a training
  manifest ``train.jsonl`` beside ``--output train.json``), nor anything at an output name that is not a regular
  file (a symlink, dangling or not, is never written through). `claim_files` checks a command's output files
  against it before any model loads; `check_writable` refuses a folder where no file can be created.

Links: an output is written by `atomic.atomic_write`, whose rename replaces a link at the name instead of following
it, or appended to by `files.append_text`, which refuses one; the claims above refuse a link at any name a command
would write before it starts, so that it never replaces a link a person made either.
"""

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import filelock

from ..errors import PathLike, WhisperRopeError
from .atomic import atomic_write_text, probe_directory
from .files import read_regular, user_path, within

#: The lock file of a claimed directory; it stays behind as the mark of the command that owns the directory.
LOCK_FILE = ".whisper-rope.lock"
#: Temporary names of `atomic_write` (``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")``: 8 random characters).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class OutputError(WhisperRopeError, ValueError):
    """An output that would replace a file the command did not write, one of its own inputs, or a directory that
    another run is using."""


def temporary_of(name: str, owned: Iterable[str]) -> bool:
    """Whether ``name`` is the temporary file of an atomic write of one of the ``owned`` names."""
    match = _TEMPORARY.match(name)
    return bool(match) and match.group("name") in set(owned)


def _resolved(path: PathLike) -> Path:
    return Path(os.path.realpath(user_path(path)))


def refuse_overlap(output: PathLike, inputs: Dict[str, Optional[PathLike]], option: str) -> None:
    """Raise `OutputError` when the output ``option`` (a file or a directory) is one of the ``inputs``, or a
    directory holding one. ``inputs`` maps a description (``--model``) to a path; None and paths that do not exist
    (model names such as ``tiny.en``) are skipped. Symlinks are resolved, so a second name for a file is caught."""
    target = _resolved(output)
    for label, value in inputs.items():
        if value is None or not user_path(value).exists():
            continue
        source = _resolved(value)
        if within(source, target):
            where = "is" if source == target else "holds"
            raise OutputError(
                f"{option} {os.fspath(output)!r} {where} the {label} {os.fspath(value)!r}: a command never replaces "
                "its own input; choose another output"
            )


@dataclass
class DirectoryClaim:
    """An output directory held by this process: the held lock on the lock file inside it (``_lock``; None for a
    claim that holds no lock, such as a non-main rank's view of the directory rank 0 claimed)."""

    path: Path
    command: str
    adopted: bool  # it already carried the mark of an earlier run of the same command
    created: bool = False  # this claim created the directory
    _lock: Optional[filelock.BaseFileLock] = None

    def release(self) -> None:
        """Unlock the directory. The lock file stays as the mark of the command, unless the run wrote nothing
        beside it: then it goes, with the directory if this claim created it, so a run refused or failed before
        its first file leaves no trace."""
        if self._lock is None:
            return
        try:
            if [entry.name for entry in self.path.iterdir()] == [LOCK_FILE]:
                os.unlink(self.path / LOCK_FILE)
                if self.created:
                    os.rmdir(self.path)
        except OSError:
            pass  # best effort: a left mark only lets the next run of the same command adopt the directory
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "DirectoryClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _mark(directory: Path) -> Optional[str]:
    """The command named by the directory's lock file, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((directory / LOCK_FILE).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def _first_link(directory: Path) -> Optional[Path]:
    """The first symlink found inside ``directory`` (at any depth, links to folders not followed), or None."""
    for folder, subfolders, files in os.walk(directory):
        for name in sorted(subfolders + files):
            if os.path.islink(os.path.join(folder, name)):
                return Path(folder, name).relative_to(directory)
    return None


def _check_claimable(path: Path, shown: str, command: str, option: str, owns: Callable[[str], bool], adopt: bool):
    """The directory's mark (or None); `OutputError` when ``path`` is not a directory ``command`` may write into."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {shown!r} is a file, expected a directory")
    link = _first_link(path) if path.is_dir() else None
    if link is not None:
        raise OutputError(
            f"{option} {shown!r} holds {os.fspath(link)!r}, a symlink: whisper-rope never writes through a link it "
            "did not make; remove the link or choose another directory"
        )
    existing = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    mark = _mark(path) if LOCK_FILE in existing else None
    if LOCK_FILE in existing and mark is None:  # a lock file without a readable mark: a run that died while marking
        mark = command if all(owns(name) for name in existing if name != LOCK_FILE) else None
    if mark is not None and mark != command:
        raise OutputError(
            f"{option} {shown!r} is the output of `whisper-rope {mark}`, not of `whisper-rope {command}`; "
            "choose another directory"
        )
    others = [name for name in existing if name != LOCK_FILE]
    foreign = [name for name in others if not owns(name)]
    if mark is None and others and (foreign or not adopt):
        listed = foreign or others
        raise OutputError(
            f"{option} {shown!r} already holds files this command did not write ({', '.join(listed[:3])}"
            f"{', ...' if len(listed) > 3 else ''}); choose a new or empty directory"
        )
    return mark


def claim_directory(
    directory: PathLike, command: str, option: str, owns: Callable[[str], bool], adopt_unmarked: bool = False
) -> DirectoryClaim:
    """Create or adopt ``directory`` as the output of ``command`` and lock it for this process.

    Accepted: a directory that does not exist or is empty; one marked by an earlier run of ``command`` (its lock
    file); with ``adopt_unmarked``, an unmarked one whose every entry ``owns`` recognises (a run directory written
    before runs were marked). Refused with `OutputError`, before anything is written: another process holds the lock,
    the directory is another command's, or it holds entries that are not the command's (named in the message).
    """
    shown = os.fspath(directory)
    path = user_path(shown)
    mark = _check_claimable(path, shown, command, option, owns, adopt_unmarked)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise OutputError(
            f"{option} {shown!r} is in use by another `whisper-rope {command}` run; wait for it to finish or choose "
            "another directory"
        ) from None
    _write_mark(path / LOCK_FILE, command)
    return DirectoryClaim(path, command, adopted=mark == command, created=created, _lock=lock)


def _write_mark(lock_file: Path, command: str) -> None:
    """Name ``command`` (and this process) in the held ``lock_file``, through a descriptor of its own: a POSIX
    ``flock`` belongs to the lock's descriptor, so closing this one keeps the lock. Where the lock forbids other
    writers (Windows' byte-range lock), the lock file stays unmarked, which `_check_claimable` reads as a run that
    died while marking."""
    payload = json.dumps({"command": command, "pid": os.getpid()}).encode()
    try:
        fd = os.open(lock_file, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, payload)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: PathLike, option: str) -> None:
    """Raise `OutputError` unless a file can be created in the output folder ``folder`` (or, when it does not exist
    yet, in its nearest existing parent, where it will be created): checked by creating and removing a temporary
    file as `atomic_write` does, so that a read-only or full folder is found before any model loads."""
    shown = os.fspath(folder)
    path = user_path(folder)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is not a directory" if existing == path else f"cannot be created: {os.fspath(existing)!r} is a file"
        raise OutputError(f"{option} {shown!r} {where}")
    try:
        probe_directory(existing)
    except OSError as error:
        raise OutputError(f"{option} {shown!r} cannot be written: {error.strerror or error}") from None


def claim_files(paths: Sequence[PathLike], option: str) -> "OutputRecord":
    """The record of the one folder that holds ``paths`` (a command's output files), after checking that the folder
    can be written and that none of the paths is something whisper-rope did not write there: `OutputError` naming it,
    before anything is read or written."""
    paths = [user_path(path) for path in paths]
    folders = {path.parent for path in paths}
    assert len(folders) == 1, f"claim_files takes the files of one folder, got {sorted(map(str, folders))}"
    folder = folders.pop()
    check_writable(folder, option)
    record = OutputRecord(folder, option)
    foreign = record.foreign([path.name for path in paths])
    if foreign:
        name, why = next(iter(foreign.items()))
        raise OutputError(
            f"{option} {os.fspath(folder / name)!r} {why}: not replaced; remove it or choose another {option}"
        )
    return record


def _is_record(data: object) -> bool:
    """Whether ``data`` (parsed JSON) has the shape of a record: {name: [size, mtime_ns]}."""
    return isinstance(data, dict) and all(
        isinstance(entry, list) and len(entry) == 2 and all(type(n) is int for n in entry) for entry in data.values()
    )


class OutputRecord:
    """The files whisper-rope wrote into one folder: name -> [size, modification time in ns] when written, kept in
    the folder's hidden ``.whisper-rope-outputs.json`` (written only once a file is).

    A file that exists but is not in the record as written (a person's own ``clip.txt``, a transcript edited since,
    or one written before files were recorded), and anything at a name that is not a regular file (a symlink,
    dangling or not; a directory), is foreign: never replaced.

    The record itself, when read (before any model loads): missing, a fresh start; a symlink, a directory, a FIFO or
    device, unreadable, or over `files.MAX_TEXT_BYTES`: `OutputError`, the command stops (a record that cannot be
    read or replaced in place cannot protect anything); a regular file that is not a record (cut or invalid JSON,
    another shape): one warning, and the run goes on with an empty record, so that every existing file counts as
    foreign, until the record is written anew.
    """

    NAME = ".whisper-rope-outputs.json"

    def __init__(self, folder: PathLike, option: str):
        self.folder = Path(folder)
        self.files: Dict[str, List[int]] = self._read(option)

    def _read(self, option: str) -> Dict[str, List[int]]:
        path = self.folder / self.NAME
        advice = f"remove it or choose another {option}"
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise OutputError(
                    f"the record of written files {os.fspath(path)!r} is a symlink: whisper-rope never reads or "
                    f"writes it through a link; {advice}"
                )
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise OutputError(
                f"the record of written files {os.fspath(path)!r} cannot be read: {error.strerror}; {advice}"
            ) from None
        raw = read_regular(path, "the record of written files", lambda message: OutputError(f"{message}; {advice}"))
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
            data = None
        if not _is_record(data):
            warnings.warn(
                f"{os.fspath(path)} is damaged (not a record of written files): every existing file in "
                f"{os.fspath(self.folder)} counts as one whisper-rope did not write, and the record is written anew",
                stacklevel=3,
            )
            return {}
        return data

    def _existing(self, names: Sequence[str]) -> Iterator[Tuple[str, os.stat_result]]:
        """(name, its lstat) for each of ``names`` that exists in the folder, links not followed."""
        for name in names:
            try:
                yield name, os.lstat(self.folder / name)
            except FileNotFoundError:
                continue

    def foreign(self, names: Sequence[str]) -> Dict[str, str]:
        """The ``names`` that are something in the folder we did not write (or that changed since), each with why
        it is foreign, in words that follow its path in a message."""
        found = {}
        for name, info in self._existing(names):
            if stat.S_ISLNK(info.st_mode):
                found[name] = "is a symlink (whisper-rope never writes through a link)"
            elif not stat.S_ISREG(info.st_mode):
                found[name] = "exists and is not a regular file"
            elif self.files.get(name) != [info.st_size, info.st_mtime_ns]:
                found[name] = "exists and was not written by whisper-rope"
        return found

    def written(self, names: Sequence[str]) -> None:
        """Record ``names`` as ours in their current state, and save the record. When it cannot be saved: the
        `OSError`, and the record stays as it was, so that it never claims a file the saved record does not."""
        before = dict(self.files)
        for name, info in self._existing(names):
            if stat.S_ISREG(info.st_mode):
                self.files[name] = [info.st_size, info.st_mtime_ns]
        try:
            atomic_write_text(self.folder / self.NAME, json.dumps(self.files, indent=1, sort_keys=True))
        except OSError:
            self.files = before
            raise
