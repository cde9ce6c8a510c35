"""Checks of the options of every command, made before any model is loaded or any file written.

Each failed check is an `OptionError`: one line naming the option (both its spellings, ``--beam-size/--beam_size``)
and what it accepts. A number's range is declared once, on its field (``bounds=``, `fields.Bounds`; the shared
ranges are below), where its help text is built too; `check_bounds` checks every field of an options object.

Upstream's ``whisper`` command passes bad values on and fails later, after the model is loaded, with a traceback
(``--temperature_increment_on_fallback 0`` divides by zero, ``--beam_size 0`` and ``--patience 0`` end inside the
beam search, ``--patience 1e308`` overflows, ``--beam_size 1000000`` fails in the allocator, ``--device cuda`` on a
CPU build ends in torch's multi-line error).
"""

import dataclasses
import math
from typing import Any, Optional

import torch

from .errors import OptionError
from .fields import Bounds, flags

__all__ = ["check_bounds", "check_device", "check_load_options", "check_transcribe_options"]

#: The most steps, intervals or rows an option counts: beyond any real run, far below where arithmetic overflows.
MAX_COUNT = 10**9
#: Beams of a beam search or candidates sampled: each holds a key-value cache of its own.
BEAMS = Bounds.integers(1, 64)
#: Clips decoded or trained together in one forward pass.
BATCH = Bounds.integers(1, 1024)
#: torch CPU threads (0: torch's default); each started thread takes memory whether or not cores are there.
THREADS = Bounds.integers(0, 1024)
#: Processes decoding audio (0: in the main process).
WORKERS = Bounds.integers(0, 256)
#: Seeds: numpy's generators take 0 to 2**32 - 1.
SEED = Bounds.integers(0, 2**32 - 1)
#: Peak learning rates of AdamW.
LEARNING_RATE = Bounds.reals(0, 1, low_open=True)
#: Padding positions (20 ms each) an unpadded encoder keeps after a clip: at most a whole 30-s window.
UNPADDED_MARGIN = Bounds.integers(0, 1500)


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


def check_bounds(options: Any) -> None:
    """Refuse the first field of the dataclass instance ``options`` whose value lies outside the `Bounds` its
    metadata declares (``bounds``); a list is checked item by item, None (an option left unset) passes."""
    for spec in dataclasses.fields(options):
        bounds = spec.metadata.get("bounds")
        value = getattr(options, spec.name)
        if bounds is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not bounds.accepts(item):
                raise OptionError(f"{flags(spec.name)} must be {bounds}, got {item!r}")


def check_load_options(options: Any) -> None:
    """`weights.loading.LoadOptions`: its numbers (``threads``, ``rotary_theta``, ``unpadded_margin``) and device."""
    check_bounds(options)
    check_device(options.device, flags("device"))


def check_transcribe_options(options: Any) -> None:
    """`cli.transcribe.TranscribeOptions`: every number within its declared range, the spans and token ids as
    upstream's command parses them."""
    check_bounds(options)
    _check_clip_timestamps(options.clip_timestamps, flags("clip_timestamps"))
    _check_suppress_tokens(options.suppress_tokens, flags("suppress_tokens"))


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
