"""Checks of the decoding and device options, made before any model is loaded or any file written.

Each failed check is an `OptionError`: one line naming the option (both its spellings, ``--beam-size/--beam_size``)
and what it accepts. Upstream's ``whisper`` command passes such values on and fails later, after the model is loaded,
with a traceback (``--temperature_increment_on_fallback 0`` divides by zero, ``--beam_size 0`` and
``--patience 0`` end inside the beam search, ``--device cuda`` on a CPU build ends in torch's multi-line error).
"""

import math
from typing import Any, Callable, Optional

import torch

from .errors import OptionError
from .options import flags

__all__ = ["check_device", "check_load_options", "check_positive", "check_transcribe_options"]


def check_device(device: Optional[str], flag: str = "--device") -> None:
    """Refuse a device string torch does not know, or a device this machine does not have (``cuda`` on a build
    or machine without CUDA, ``cuda:N`` past the last GPU, ``mps`` without Metal). None (the default) passes."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{flag} {device!r} is not a device: expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"{flag} {device}: this machine or PyTorch build has no usable CUDA device; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(f"{flag} {device}: there are {count} CUDA devices, cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(f"{flag} {device}: this machine or PyTorch build has no usable MPS device; use cpu")
    elif parsed.type != "cpu":
        raise OptionError(f"{flag} {device}: whisper_rope runs on cpu, cuda or mps devices")


def check_load_options(options: Any) -> None:
    """`weights.loading.LoadOptions` (``device``, ``threads``, ``rotary_theta``, ``unpadded_margin``)."""
    check_device(options.device, flags("device"))
    _check(options.threads, flags("threads"), _integer(0), "a whole number >= 0 (0: torch's default)")
    check_positive(options.rotary_theta, flags("rotary_theta"))
    _check(options.unpadded_margin, flags("unpadded_margin"), _integer(0), "a whole number >= 0")


def check_transcribe_options(options: Any) -> None:
    """`transcribe.TranscribeOptions`: every number within what upstream's decoding accepts."""
    rules = (
        ("temperature", _non_negative, "a finite number >= 0"),
        ("best_of", _integer(1), "a whole number >= 1, or None"),
        ("beam_size", _integer(1), "a whole number >= 1, or None"),
        ("patience", _positive, "a finite number > 0, or None"),
        ("length_penalty", lambda x: _finite(x) and 0 <= x <= 1, "between 0 and 1, or None"),
        ("temperature_increment_on_fallback", _positive, "a finite number > 0, or None (no fallback)"),
        ("compression_ratio_threshold", _finite, "a finite number, or None"),
        ("logprob_threshold", _finite, "a finite number, or None"),
        ("no_speech_threshold", _finite, "a finite number, or None"),
        ("hallucination_silence_threshold", _non_negative, "a finite number of seconds >= 0, or None"),
        ("max_line_width", _integer(1), "a whole number >= 1, or None"),
        ("max_line_count", _integer(1), "a whole number >= 1, or None"),
        ("max_words_per_line", _integer(1), "a whole number >= 1, or None"),
        ("batch_size", _integer(1), "a whole number of files >= 1"),
    )
    for name, ok, expected in rules:
        _check(getattr(options, name), flags(name), ok, expected)
    _check_clip_timestamps(options.clip_timestamps, flags("clip_timestamps"))
    _check_suppress_tokens(options.suppress_tokens, flags("suppress_tokens"))


def check_positive(value: Optional[float], name: str) -> None:
    """Refuse a value that is not a finite number > 0 (NaN, infinities, zero, negatives); None passes."""
    _check(value, name, _positive, "a finite number > 0")


def _check(value: Any, flag: str, ok: Callable[[Any], bool], expected: str) -> None:
    """None always passes (an option left unset); anything else must satisfy ``ok``."""
    if value is not None and (isinstance(value, bool) or not ok(value)):
        raise OptionError(f"{flag} must be {expected}, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _non_negative(value: Any) -> bool:
    return _finite(value) and value >= 0


def _positive(value: Any) -> bool:
    return _finite(value) and value > 0


def _integer(minimum: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and value >= minimum


def _check_clip_timestamps(text: str, flag: str) -> None:
    """Upstream's form: ``start,end,start,end,...`` seconds (a last start without an end runs to the end)."""
    try:
        times = [float(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise OptionError(f"{flag} must be comma-separated seconds (start,end,...), got {text!r}") from None
    if not all(math.isfinite(t) and t >= 0 for t in times):
        raise OptionError(f"{flag} must be finite, non-negative seconds, got {text!r}")
    for start, end in zip(times[::2], times[1::2]):
        if end <= start:
            raise OptionError(f"{flag}: each end must be after its start, got {start:g},{end:g}")


def _check_suppress_tokens(text: str, flag: str) -> None:
    try:
        [int(part) for part in text.split(",")]  # upstream's parse
    except ValueError:
        raise OptionError(f"{flag} must be comma-separated token ids (-1: the default set), got {text!r}") from None
