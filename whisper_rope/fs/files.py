"""Opening the files a user or a model directory names: paths as typed, regular files only, and nothing outside a
model directory.

* `user_path` expands ``~`` (no shell does it in ``--option=~/x``, in a config file, or when a program passes the
  argument); relative paths stay relative to the working directory.
* `read_regular` reads a small file (a manifest, a config) after checking it is a regular file, so that a FIFO
  cannot block the reader forever nor a device feed it without end.
* `inside` resolves a name a model directory gives for one of its files (an index's shard, ``config.json``) and
  refuses one that leads out of the directory (``../x``, an absolute name, a symlink to elsewhere) or is not a
  regular file. The one layout whose links lead out is Hugging Face's download cache
  (``snapshots/REV/NAME -> ../../blobs/HASH``): links into that repository's ``blobs`` folder are followed.
* `within` tells whether a path is a folder or lies inside it: the one test of `inside` and
  `outputs.refuse_overlap`.
* `append_text` adds to a file a command keeps writing (a training log) without ever following a link at its name.
"""

import os
import stat
from pathlib import Path, PurePath
from typing import Callable, Optional, Tuple

from ..errors import PathLike, one_line

#: Largest JSON or text file read whole (configs, indexes, manifests); real ones are kilobytes to a few megabytes.
MAX_TEXT_BYTES = 256 << 20


def user_path(path: PathLike) -> Path:
    """``path`` as its user meant it: ``~`` and ``~user`` expanded, otherwise unchanged."""
    return Path(os.path.expanduser(os.fspath(path)))


def is_regular(path: PathLike) -> bool:
    """True for a regular file (after following symlinks); False for FIFOs, devices, directories, missing paths."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_regular(path: PathLike, what: str, fail: Callable[[str], Exception], limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of the regular file ``path``; ``fail(message)`` builds the error raised for anything else (a FIFO,
    a device, a directory, a file over ``limit`` bytes, an unreadable file). ``what`` names the file's role."""
    name = os.fspath(path)
    problem, data = _read_regular(name, limit)
    if problem is not None:
        raise fail(f"{what} {name!r} {problem}")
    return data


def _read_regular(name: str, limit: int) -> Tuple[Optional[str], bytes]:
    """(what is wrong with the file ``name`` or None, its bytes); the caller turns the problem into its own error,
    so that an error type deriving from OSError is never caught here."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return "does not exist", b""
    except OSError as error:
        return f"cannot be read: {error.strerror}", b""
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return "is a directory, not a file", b""
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file (a FIFO, socket or device)", b""
        if info.st_size > limit:
            return f"is {info.st_size} bytes; at most {limit} are read", b""
        os.set_blocking(fd, True)
        return _read_all(fd, info.st_size, limit)
    except OSError as error:
        return f"cannot be read: {error.strerror}", b""
    finally:
        os.close(fd)


def _read_all(fd: int, size: int, limit: int) -> Tuple[Optional[str], bytes]:
    """Everything ``fd`` holds, read in pieces no larger than the file (a read of ``limit`` bytes would allocate
    that much at once); a file that grew past ``limit`` since it was measured is refused."""
    chunks, total = [], 0
    want = min(size, limit) + 1  # one byte more than the file holds, to see its end in one read
    while True:
        chunk = os.read(fd, want)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return f"holds more than {limit} bytes", b""
        if len(chunk) < want:  # a regular file reads short only at its end
            return None, b"".join(chunks)
        want = min(1 << 16, limit + 1 - total)


def append_text(path: PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``, creating it with the user's umask; a symlink at ``path`` is an `OSError`
    (ELOOP), never followed, so that a link placed in an output folder cannot choose where the program writes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "ab") as handle:
        handle.write(text.encode("utf-8"))


def within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, compared as given (resolve both first to follow links)."""
    return path == folder or folder in path.parents


def inside(directory: PathLike, name: object, what: str, fail: Callable[[str], Exception],
           required: bool = True) -> Optional[Path]:  # fmt: skip
    """``directory / name``, after checking that it is a file of the model directory ``directory``.

    Raises ``fail(message)`` when ``name`` is not a non-empty string, is absolute, climbs with ``..``, resolves
    (through symlinks) outside the directory (or outside the ``blobs`` folder of a Hugging Face cache snapshot), or
    is not a regular file. A missing file is an error when ``required``, else None.
    """
    label = f"{what} {one_line(repr(name), 120)} of {os.fspath(directory)!r}"
    if not isinstance(name, str) or not name or "\0" in name:
        raise fail(f"{label} is not a file name")
    parts = PurePath(name).parts
    if PurePath(name).is_absolute() or ".." in parts:
        raise fail(f"{label} is not a name inside the directory")
    root = Path(os.path.realpath(directory))
    real = Path(os.path.realpath(root / name))
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(within(real, folder) for folder in allowed):
        raise fail(f"{label} leads out of the directory (to {str(real)!r})")
    if not os.path.lexists(real):
        if required:
            raise fail(f"{label} does not exist")
        return None
    if not is_regular(real):
        raise fail(f"{label} is not a regular file")
    return Path(directory) / name  # as the directory names it, so that messages show the name the user knows
