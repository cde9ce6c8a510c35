"""Reliability and security battery: hostile, corrupt and unusual inputs, crashes and full disks.

Each module pins one area of docs/reliability.md. Runs are sized for CI (a few minutes on two cores);
``WHISPER_ROPE_LONG=1`` multiplies the fuzzing examples and kill counts and adds the slow audio cases.

Known bugs are pinned by tests marked `known_bug`: strict expected failures, so the suite stays green while the bug
is there and turns red (XPASS) once it is fixed, which is the cue to delete the marker. ``pytest --runxfail``
shows them failing.
"""

import contextlib
import os
import re
import resource
import signal
import tracemalloc
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SPEECH = REPO / "tests" / "fixtures" / "speech"

#: True under ``WHISPER_ROPE_LONG=1``: longer fuzzing, more kills, the slow audio formats.
LONG = os.environ.get("WHISPER_ROPE_LONG") == "1"


def scaled(ci: int, long: int) -> int:
    """An example or repetition count: ``ci`` normally, ``long`` under ``WHISPER_ROPE_LONG=1``."""
    return long if LONG else ci


def known_bug(reason: str):
    """Mark a test that fails because of a reported bug (strict: an unexpected pass fails the run)."""
    return pytest.mark.xfail(reason=f"known bug: {reason}", strict=True)


def subprocess_env() -> dict:
    """The environment for child Pythons: this checkout first on the import path, one torch thread."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test interrupts: SIGINT handled as in a terminal. A suite started in the
    background of a non-interactive shell inherits SIGINT ignored, and so would every child (then Ctrl-C tests
    would see a command run to its end)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args) -> int:
    """``whisper-rope ARGS`` in this process: its exit status, whether main returned it or raised SystemExit."""
    from whisper_rope import cli

    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


#: Transcription options that keep the random model fast: greedy, one temperature, text output only.
FAST_TRANSCRIBE = (
    "--output_format",
    "txt",
    "--fp16",
    "False",
    "--verbose",
    "False",
    "--temperature_increment_on_fallback",
    "None",
    "--beam_size",
    "None",
    "--best_of",
    "None",
)


def transcribe(model: Path, inputs, output: Path) -> int:
    """``whisper-rope transcribe INPUTS --model MODEL --output_dir OUTPUT`` (fast options); the exit status."""
    return run_cli(*inputs, "--model", model, "--output_dir", output, *FAST_TRANSCRIBE)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A small random upstream-variant checkpoint with 1500 audio positions (transcribe pads windows to 30 s)."""
    import whisper_rope

    from ..conftest import small_dims

    torch.manual_seed(0)
    model = whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper")
    return whisper_rope.save_checkpoint(model, tmp_path_factory.mktemp("model") / "random.pt")


def assert_one_line_error(text: str, *fragments: str, prefix: str = "whisper-rope: error: ") -> str:
    """``text`` (stderr) is exactly one line, starting with ``prefix`` and holding every fragment; no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    assert lines[0].startswith(prefix), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_clear_message(error: BaseException) -> str:
    """A library error's message: one non-empty line of readable text (no repr of raw bytes, no traceback)."""
    message = str(error)
    assert message.strip(), f"{type(error).__name__} has an empty message"
    assert "\n" not in message.strip(), f"multi-line message: {message!r}"
    assert not re.search(r"Traceback \(most recent call last\)", message)
    return message


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, VmSize ...) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart the kernel's resident-set high-water mark (VmHWM) from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class PeakMemory:
    """Peak allocation of a block, two ways: Python-level allocations (``tracemalloc``: bytes, bytearrays,
    numpy) and resident-set growth (VmHWM after minus VmRSS before: also torch's allocator and mapped pages).

    Usage: ``with PeakMemory() as peak: ...``, then ``peak.traced`` and ``peak.resident`` in bytes.
    """

    def __enter__(self) -> "PeakMemory":
        self._started_tracing = not tracemalloc.is_tracing()
        if self._started_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._traced_before = tracemalloc.get_traced_memory()[0]
        self._rss_before = status_kib("VmRSS")
        reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.resident = max(0, status_kib("VmHWM") - self._rss_before) * 1024
        self.traced = max(0, tracemalloc.get_traced_memory()[1] - self._traced_before)
        if self._started_tracing:
            tracemalloc.stop()


class Hang(BaseException):
    """A block ran past its `time_limit` (a BaseException, so that no ``except Exception`` in the code under test
    hides it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `Hang` in the main thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise Hang(f"ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def address_space_cap(headroom: int):
    """Cap RLIMIT_AS at the current address space plus ``headroom`` bytes, so that a giant allocation fails at
    once instead of being reserved lazily; restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = status_kib("VmSize") * 1024 + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
