"""Exception types raised by whisper_rope, and the one way their messages are made one line (`one_line`); the
command line reports them through `whisper_rope.cli.runtime`.

Each error carries one sentence naming the input (file, tensor, option) and what was expected.  They subclass
``ValueError`` so that callers who already catch bad-input errors from numpy/torch keep working, and the CLI turns
any ``WhisperRopeError`` into a one-line message and a non-zero exit.
"""

import errno
import os
import re
from typing import Optional, Union

#: A file-system path as every public function accepts it.
PathLike = Union[str, os.PathLike]

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
