"""Exception types raised by whisper_rope, the one way their messages are made one line, and the one way a command
reports them (`run_command`).

Each error carries one sentence naming the input (file, tensor, option) and what was expected.  They subclass
``ValueError`` so that callers who already catch bad-input errors from numpy/torch keep working, and the CLI turns
any ``WhisperRopeError`` into a one-line message and a non-zero exit.
"""

import contextlib
import errno
import os
import re
import sys
import traceback as tb
import warnings
from typing import Callable, Iterator, Optional, Union

#: A file-system path as every public function accepts it.
PathLike = Union[str, os.PathLike]

#: Exit status of a command refused for bad input (argparse's for a usage error too), and of one stopped by Ctrl-C.
BAD_INPUT = 2
INTERRUPTED = 130

# Terminal escape sequences (torch colours parts of its unsafe-pickle explanation) and other control characters.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class WhisperRopeError(Exception):
    """Base class of every error whisper_rope raises on purpose."""


class VariantError(WhisperRopeError, ValueError):
    """An unknown or invalid positional-embedding variant or option."""


class CheckpointError(WhisperRopeError, ValueError):
    """A checkpoint (ours, upstream, CTranslate2 or Hugging Face) that cannot be read or does not fit the model."""


class ModelNotFoundError(WhisperRopeError, FileNotFoundError):
    """A model name or path that resolves to no weights."""


class AudioError(WhisperRopeError, ValueError):
    """An audio file that is missing, empty or cannot be decoded."""


class DataError(WhisperRopeError, ValueError):
    """A manifest or training example that cannot be used."""


class OptionError(WhisperRopeError, ValueError):
    """An option (of a command or a function) outside what it accepts."""


class OutOfResources(WhisperRopeError, MemoryError):
    """The machine ran out of memory, threads or open files: no fault of the input being read (`out_of_resources`)."""


class TrainingError(WhisperRopeError, RuntimeError):
    """Training cannot continue (a non-finite loss, a checkpoint that does not fit this run)."""


def one_line(text: object, limit: Optional[int] = 300) -> str:
    """``text`` (a message or an exception) as one readable line for an error message: escape codes dropped,
    control characters (newlines included) turned into spaces, whitespace collapsed, cut to ``limit`` characters
    (None: not cut). An exception without a message is named by its type."""
    line = " ".join(_CONTROL.sub(" ", _ANSI_ESCAPE.sub("", str(text))).split())
    if not line and isinstance(text, BaseException):
        line = type(text).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


#: How torch, OpenMP and the C library say the machine ran out of memory, threads or file descriptors.
_RESOURCE_PHRASES = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
    "resource temporarily unavailable",
    "pthread_create",
    "too many open files",
)


def out_of_resources(error: BaseException) -> bool:
    """Whether ``error`` says the machine ran out of memory, threads or open files (Python's MemoryError, torch's
    allocators, a thread pool that cannot start, the kernel's ENOMEM/EAGAIN/EMFILE/ENFILE): a fault of the machine,
    never of the file being read, so a reader passes it on rather than calling the file damaged."""
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, OSError):
        return error.errno in (errno.ENOMEM, errno.EAGAIN, errno.EMFILE, errno.ENFILE)
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(phrase in text for phrase in _RESOURCE_PHRASES)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``error``'s message through `one_line`: for libraries (torch) whose messages
    open with the reason and go on with pages of explanation."""
    lines = [line for line in _ANSI_ESCAPE.sub("", str(error)).splitlines() if line.strip()]
    return one_line(lines[0], limit) if lines else type(error).__name__


@contextlib.contextmanager
def quiet_worker_disconnects() -> Iterator[None]:
    """While a command runs, drop the tracebacks of multiprocessing's resource-sharer thread losing a peer.

    DataLoader workers hand tensors to the main process through that thread (file-descriptor sharing). A Ctrl-C
    from a terminal reaches the whole process group, so the workers may die in the middle of a hand-over and the
    thread, which reports its own errors through ``sys.excepthook``, would print a BrokenPipeError traceback after
    the command's one line ``interrupted``. A worker that dies otherwise is still reported, by the DataLoader.
    After a KeyboardInterrupt the hook is left in place for the rest of the (exiting) process.
    """
    previous = sys.excepthook

    def hook(kind, error, traceback) -> None:
        frames = [frame.filename for frame in tb.extract_tb(traceback)]
        from_sharer = any(name.endswith(os.path.join("multiprocessing", "resource_sharer.py")) for name in frames)
        if not (from_sharer and issubclass(kind, (ConnectionError, EOFError))):
            previous(kind, error, traceback)

    sys.excepthook = hook
    try:
        yield
    except KeyboardInterrupt:
        raise  # the hook stays: the process is exiting, and hand-overs may still break until the workers are gone
    except BaseException:
        sys.excepthook = previous
        raise
    sys.excepthook = previous


def print_error(message: str) -> None:
    """``whisper-rope: error: MESSAGE`` on stderr, the form argparse gives a usage error."""
    print(f"whisper-rope: error: {message}", file=sys.stderr)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within the block, a warning prints as ``whisper-rope: warning: MESSAGE``: one line, like the errors, instead
    of Python's file:line header and a line of our source (a non-finite audio sample, an English-only model asked
    for another language)."""
    previous = warnings.formatwarning

    def one_line_warning(message, category, *args, **kwargs) -> str:
        return f"whisper-rope: warning: {one_line(message, limit=None)}\n"

    warnings.formatwarning = one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def run_command(run: Callable[[], int]) -> int:
    """Run one command as every entry point does (``whisper-rope``, ``python -m whisper_rope.training|evaluation``).

    Warnings print as one line each (`one_line_warnings`); a bad-input error (ValueError, OSError, RuntimeError)
    becomes one line on stderr and status `BAD_INPUT`; running out of memory (`OutOfResources` included) one line
    and status 1; Ctrl-C the line
    ``interrupted`` and status `INTERRUPTED`, without the tracebacks of lost loader workers
    (`quiet_worker_disconnects`). Returns that status, or the command's own.
    """
    try:
        with one_line_warnings(), quiet_worker_disconnects():
            return run()
    except KeyboardInterrupt:
        print_error("interrupted")
        return INTERRUPTED
    except (ValueError, OSError, RuntimeError) as error:
        print_error(one_line(error, limit=None))
        return BAD_INPUT
    except MemoryError as error:
        message = one_line(str(error), limit=None)  # Python's own MemoryError has no message
        print_error(message if "memory" in message.lower() else f"out of memory {message}".strip())
        return 1
