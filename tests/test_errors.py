"""errors.py: the one-line messages' helpers and what a Ctrl-C may leave behind in background threads."""

import os
import sys

import pytest

from whisper_rope.cli.runtime import quiet_worker_disconnects

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


def _warns_then(outcome):
    def run():
        import warnings

        warnings.warn("three NaN samples\nbecame silence", stacklevel=1)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return run


@pytest.mark.parametrize(
    "outcome, status, error_line",
    [
        (0, 0, None),
        (1, 1, None),  # the command's own status (transcribe: some file failed)
        (ValueError("--beam_size must be\n a positive number"), 2, "--beam_size must be a positive number"),
        (FileNotFoundError("no such file: a.wav"), 2, "no such file: a.wav"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_every_entry_point_reports_warnings_and_errors_in_one_line_each(capsys, outcome, status, error_line):
    import warnings

    from whisper_rope.cli.runtime import run_command

    previous = warnings.formatwarning

    def show(message, category, filename, lineno, file=None, line=None):  # Python's, which pytest replaces
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        assert run_command(_warns_then(outcome)) == status
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "whisper-rope: warning: three NaN samples became silence"
    assert lines[1:] == ([] if error_line is None else [f"whisper-rope: error: {error_line}"])
    assert warnings.formatwarning is previous


def test_the_standalone_entry_points_report_as_the_whisper_rope_command(tmp_path, capsys):
    """``python -m whisper_rope.evaluation`` returns its status where ``whisper-rope evaluate`` exits with it."""
    from whisper_rope import cli
    from whisper_rope.cli.evaluate import main

    args = ["--model", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--no-progress", "--device", "cpu"]
    assert main(args) == 2
    standalone = capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["evaluate", *args])
    assert exited.value.code == 2 and capsys.readouterr().err == standalone
    assert standalone.startswith("whisper-rope: error: ") and standalone.count("\n") == 1
