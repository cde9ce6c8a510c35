"""errors.py: the one-line messages' helpers and what a Ctrl-C may leave behind in background threads."""

import os
import sys

import pytest

from whisper_rope.errors import quiet_worker_disconnects

SHARER = os.path.join(os.sep, "lib", "python3", "multiprocessing", "resource_sharer.py")


def _raised(kind, filename):
    """(type, error, traceback) of ``kind`` raised by code whose frames name ``filename``."""
    try:
        exec(compile(f"raise {kind.__name__}('peer gone')", filename, "exec"))
    except kind:
        return sys.exc_info()


def test_resource_sharer_disconnects_are_dropped_and_everything_else_reported(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, traceback: reported.append(kind))
    with quiet_worker_disconnects():
        sys.excepthook(*_raised(BrokenPipeError, SHARER))  # a worker killed by the same Ctrl-C
        sys.excepthook(*_raised(ConnectionResetError, SHARER))
        sys.excepthook(*_raised(ValueError, SHARER))  # not a lost peer: reported
        sys.excepthook(*_raised(BrokenPipeError, "/home/user/job.py"))  # not the sharer: reported
    assert reported == [ValueError, BrokenPipeError]
    sys.excepthook(*_raised(BrokenPipeError, SHARER))  # the command ended normally: the previous hook is back
    assert reported == [ValueError, BrokenPipeError, BrokenPipeError]


def test_after_an_interrupt_the_hook_stays_for_the_exiting_process(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, traceback: reported.append(kind))
    with pytest.raises(KeyboardInterrupt):
        with quiet_worker_disconnects():
            raise KeyboardInterrupt
    sys.excepthook(*_raised(BrokenPipeError, SHARER))
    assert reported == []
    with pytest.raises(ValueError):
        with quiet_worker_disconnects():
            raise ValueError("bad input")
