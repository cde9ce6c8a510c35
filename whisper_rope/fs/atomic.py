"""Atomic file writes: a crash at any moment leaves either the previous file or the complete new one.

Checkpoints, converted models, caches, training state, transcripts and evaluation results all go through
`atomic_write`. Its rename replaces whatever is at the name, a symlink included, by the new regular file: a write
never follows a link (docs/reliability.md, "Outputs"). New files get the mode any program's new file gets, 0666
without the user's umask (``umask 077``: readable by the user alone).
"""

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Tuple

import torch

from ..errors import PathLike


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    The rename is atomic on POSIX: a concurrent reader sees the old file or the complete new one, and two writers
    racing on the same path both succeed (the last rename wins). The directory is fsynced so the rename survives a
    power loss. On any error the temporary file is removed and ``path`` is untouched; a KeyboardInterrupt is raised
    as itself even when the writer (torch's zip writer) wrapped it in its own error.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd = tmp_name = handle = None
    try:
        # A Ctrl-C inside mkstemp, after it created the file, would leave a file whose name never reached us; one
        # inside fdopen, after its file object took the descriptor, would leave us a descriptor already closed.
        with _interrupts_held():
            fd, tmp_name = _create_temporary(directory, path.name)
            handle = os.fdopen(fd, "wb")
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, umasked(0o666))  # mkstemp creates 0600, whatever the umask
        os.replace(tmp_name, path)
    except BaseException as error:
        if handle is None and fd is not None:
            os.close(fd)  # no file object took the descriptor
        elif handle is not None and getattr(handle, "closed", True) is False:
            handle.close()  # a Ctrl-C held through fdopen came out before `with handle` could close it
        try:
            if tmp_name is not None:
                os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        interrupt = _in_chain(error, lambda e: isinstance(e, KeyboardInterrupt))
        if interrupt is not None and interrupt is not error:
            # torch's writer reports a Ctrl-C inside its own write callback as a RuntimeError; an interrupt stays one.
            raise interrupt.with_traceback(None) from None
        cause = _in_chain(error, lambda e: isinstance(e, OSError) and e.errno is not None)
        if cause is None:
            raise
        # torch.save reports a failed write (a full disk) as its own RuntimeError; name the file and the cause.
        raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from error
    fsync_directory(directory)
    return path


def _create_temporary(directory: Path, name: str) -> Tuple[int, str]:
    """(descriptor, path) of a new, empty temporary file ``.NAME.XXXXXXXX.tmp`` in ``directory`` (mode 0600)."""
    return tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")


def probe_directory(directory: PathLike) -> None:
    """Raise the `OSError` an `atomic_write` into ``directory`` would meet creating its temporary file (a read-only
    folder, a full inode table, no permission); create nothing that stays."""
    fd = tmp_name = None
    try:
        with _interrupts_held():
            fd, tmp_name = _create_temporary(Path(directory), "whisper-rope-probe")
    finally:
        if fd is not None:
            os.close(fd)
            os.unlink(tmp_name)


_UMASK_READ = threading.Lock()


def umasked(mode: int) -> int:
    """``mode`` without the bits of the process's umask: what ``open(2)`` (0666) or ``mkdir(2)`` (0777) would give
    a new file or folder, for those created private first (``mkstemp``, ``mkdtemp``, safetensors)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux 4.7+: read without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return mode & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere: set and restore. 077 meanwhile, so that a file another thread creates is at worst private; the lock
    # keeps two writers from restoring each other's value.
    with _UMASK_READ:
        umask = os.umask(0o077)
        os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Run the block with a Ctrl-C that arrives during it raised as KeyboardInterrupt only once it ends.

    Only where Python's own SIGINT handler is installed and can be swapped (the main thread); elsewhere the block
    runs as it is.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def fsync_directory(directory: PathLike) -> None:
    """Make renames inside ``directory`` durable; a filesystem that refuses fsync on directories is ignored (the
    rename itself already happened)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _in_chain(error: BaseException, wanted: Callable[[BaseException], bool]) -> "BaseException | None":
    """The first exception in ``error``'s cause/context chain (``error`` itself included) that is ``wanted``."""
    seen = set()
    while error is not None and id(error) not in seen:
        if wanted(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_write_text(path: PathLike, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_torch_save(obj: object, path: PathLike) -> Path:
    """``torch.save`` through `atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, _LateWritesDropped(handle)))


class _LateWritesDropped:
    """A binary file for torch's zip writer whose writes after the file closed are dropped.

    torch's writer writes its closing records when it is freed. After a Ctrl-C inside ``torch.save`` it is freed
    with the exception's frames, after `atomic_write` has closed (and removed) the temporary file; the write then
    raises inside a C++ destructor, and the process aborts instead of exiting 130. The file is gone by then, so
    nothing is lost by dropping those bytes."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle

    def write(self, data) -> int:
        if self._closed():
            return len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        if not self._closed():
            self.handle.flush()

    def _closed(self) -> bool:
        return bool(getattr(self.handle, "closed", False))  # any object with write() may stand in for a file
