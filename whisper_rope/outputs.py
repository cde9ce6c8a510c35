"""What a command may write: never a file it did not create, never its own input, never a directory another run is
using (docs/reliability.md, "Outputs").

* `refuse_overlap` stops a command whose output is, or would hold, one of its inputs.
* `claim_directory` adopts an output directory for one command (new, empty, or marked by an earlier run of the same
  command) and holds an exclusive ``flock`` on it until `DirectoryClaim.release` or the process ends; a directory of
  someone else's files, or one another process is using, is refused in one line.
* `temporary_of` recognises the temporary files of our own atomic writes, so that a command sweeps only those.
* `TranscriptRecord` remembers which transcripts ``transcribe`` wrote into a folder, so that a later run replaces
  its own and never a file a person put there (a reference ``clip.txt`` beside ``clip.flac``).
"""

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from .atomic import atomic_write_text
from .errors import PathLike, WhisperRopeError
from .files import user_path

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


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_overlap(output: PathLike, inputs: Dict[str, Optional[PathLike]], option: str) -> None:
    """Raise `OutputError` when the output ``option`` (a file or a directory) is one of the ``inputs``, or a
    directory holding one. ``inputs`` maps a description (``--model``) to a path; None and paths that do not exist
    (model names such as ``tiny.en``) are skipped. Symlinks are resolved, so a second name for a file is caught."""
    target = _resolved(output)
    for label, value in inputs.items():
        if value is None or not user_path(value).exists():
            continue
        source = _resolved(value)
        if _inside(source, target):
            where = "is" if source == target else "holds"
            raise OutputError(
                f"{option} {os.fspath(output)!r} {where} the {label} {os.fspath(value)!r}: a command never replaces "
                "its own input; choose another output"
            )


@dataclass
class DirectoryClaim:
    """An output directory held by this process: an open, ``flock``-ed lock file inside it (``_fd``; None for a
    claim that holds no lock, such as a non-main rank's view of the directory rank 0 claimed)."""

    path: Path
    command: str
    adopted: bool  # it already carried the mark of an earlier run of the same command
    created: bool = False  # this claim created the directory
    _fd: Optional[int] = None

    def release(self) -> None:
        """Unlock the directory. The lock file stays as the mark of the command, unless the run wrote nothing
        beside it: then it goes, with the directory if this claim created it, so a run refused or failed before
        its first file leaves no trace."""
        if self._fd is None:
            return
        try:
            if [entry.name for entry in self.path.iterdir()] == [LOCK_FILE]:
                os.unlink(self.path / LOCK_FILE)
                if self.created:
                    os.rmdir(self.path)
        except OSError:
            pass  # best effort: a left mark only lets the next run of the same command adopt the directory
        os.close(self._fd)
        self._fd = None

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


def _check_claimable(path: Path, shown: str, command: str, option: str, owns: Callable[[str], bool], adopt: bool):
    """The directory's mark (or None); `OutputError` when ``path`` is not a directory ``command`` may write into."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {shown!r} is a file, expected a directory")
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
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(
            f"{option} {shown!r} is in use by another `whisper-rope {command}` run; wait for it to finish or choose "
            "another directory"
        ) from None
    payload = json.dumps({"command": command, "pid": os.getpid()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, payload, 0)
    return DirectoryClaim(path, command, adopted=mark == command, created=created, _fd=fd)


class TranscriptRecord:
    """The transcripts a command wrote into one folder: name -> [size, modification time in ns] when written, kept
    in the folder's hidden ``.whisper-rope-outputs.json`` (written only once a transcript is).

    A file that exists but is not in the record as written (a person's own ``clip.txt``, a transcript edited since,
    or one written before transcripts were recorded) is never replaced.
    """

    NAME = ".whisper-rope-outputs.json"

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        try:
            data = json.loads((self.folder / self.NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}  # none yet, or unreadable: then no existing file counts as ours, the safe side
        self.files: Dict[str, List[int]] = data if isinstance(data, dict) else {}

    def foreign(self, names: Sequence[str]) -> List[str]:
        """The ``names`` that exist in the folder and were not written by us (or were changed since)."""
        found = []
        for name in names:
            try:
                stat = os.stat(self.folder / name)
            except FileNotFoundError:
                continue
            if self.files.get(name) != [stat.st_size, stat.st_mtime_ns]:
                found.append(name)
        return found

    def written(self, names: Sequence[str]) -> None:
        """Record ``names`` as ours in their current state, and save the record."""
        for name in names:
            try:
                stat = os.stat(self.folder / name)
            except FileNotFoundError:
                continue
            self.files[name] = [stat.st_size, stat.st_mtime_ns]
        atomic_write_text(self.folder / self.NAME, json.dumps(self.files, indent=1, sort_keys=True))
