"""How every command runs (``whisper-rope`` and ``python -m whisper_rope.training|evaluation``): its warnings and
errors as one line each, its exit status, Ctrl-C as an interrupt without the tracebacks of lost loader workers.
Only the command line imports this module."""

import contextlib
import os
import sys
import traceback as tb
import warnings
from typing import Callable, Iterator

from ..errors import one_line

#: Exit status of a command refused for bad input (argparse's for a usage error too), and of one stopped by Ctrl-C.
BAD_INPUT = 2
INTERRUPTED = 130


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
