"""How a job's dataclass declares its fields and checks them: each field's default, help text and accepted values
in one call (`opt`), file and folder fields typed `PathText`/`NamedPath` (their ``~`` expanded), how messages name a
field's option (`flags`), the ranges several jobs share (`BATCH`, `BEAMS`, ...), and the checks every job's
``validate`` makes of its fields (`check_bounds`, `check_device`).

Every job's options are such a dataclass (`LoadOptions`, `EvaluationOptions`, `FinetuneConfig`, `CompareConfig`, the
commands' `TranscribeOptions`, ...), and each that holds more than paths validates itself in one method, ``validate``,
before any model is loaded or any file written: a failed check is an `OptionError` (or another ``ValueError``), one line
naming the option (both its spellings, ``--beam-size/--beam_size``) and what it accepts. A number's range is declared
once, on its field (``bounds=``), where its help text is built too. `whisper_rope.cli.arguments` builds the command
line's options from the same fields, so that the Python API and the CLI cannot drift. This module imports no argparse:
the library uses it without the command line.

Upstream's ``whisper`` command passes bad values on and fails later, after the model is loaded, with a traceback
(``--temperature_increment_on_fallback 0`` divides by zero, ``--beam_size 0`` and ``--patience 0`` end inside the
beam search, ``--patience 1e308`` overflows, ``--beam_size 1000000`` fails in the allocator, ``--device cuda`` on a
CPU build ends in torch's multi-line error).
"""

import copy
import dataclasses
import functools
import math
import numbers
import os
import typing
from typing import Any, Callable, Dict, NewType, Optional, Type

import torch

from .errors import OptionError
from .fs.files import user_path

#: The type of an option that names a file or folder: text (``str`` at run time) whose ``~`` is expanded.
PathText = NewType("PathText", str)
#: The type of an option that is ``NAME=PATH`` or a plain path: text whose path's ``~`` is expanded.
NamedPath = NewType("NamedPath", str)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The numbers an option accepts: whole numbers (``whole``) or finite ones, from ``low`` to ``high`` (None: no
    bound on that side; ``low_open``/``high_open`` exclude the bound itself). Declared as a field's ``bounds``
    metadata (``opt(5, "beams", bounds=Bounds.integers(1, 64))``): `check_bounds` refuses other values
    and the option's help states the range (``str(bounds)``). None, an option left unset, is checked by no bounds.
    """

    low: Optional[float] = None
    high: Optional[float] = None
    whole: bool = False
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def integers(cls, low: int, high: Optional[int] = None) -> "Bounds":
        """Whole numbers from ``low`` to ``high`` (counts, sizes, steps, seeds)."""
        return cls(low, high, whole=True)

    @classmethod
    def reals(cls, low: Optional[float] = None, high: Optional[float] = None, **open_sides: bool) -> "Bounds":
        """Finite numbers from ``low`` to ``high`` (``low_open=True``: above ``low``)."""
        return cls(low, high, **open_sides)

    def accepts(self, value: Any) -> bool:
        kind = numbers.Integral if self.whole else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {_number(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {_number(self.high)}"
        if low and high and not (self.low_open or self.high_open):
            return f"{kind} from {_number(self.low)} to {_number(self.high)}"
        return " ".join([kind, " and ".join(side for side in (low, high) if side)]).strip()


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
#: Nats taken off the end-of-text logit of windows that hold their audio's end (`decoding/end_of_text.py`): 20 makes
#: end of text 5e8 times less likely; more is a typo, not a setting.
EOT_PENALTY = Bounds.reals(0, 20)


def _number(value: float) -> str:
    """A bound as people write it: 64, 0.01, 1e+09, 4294967295."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def option(help: str, **argparse_options: Any) -> Dict[str, Any]:
    """A dataclass field's ``metadata``: its help text and any other ``argparse.add_argument`` keywords."""
    return {"help": help, **argparse_options}


def opt(default: Any, help: str, **argparse_options: Any) -> Any:
    """A dataclass field that is a command-line option: ``batch_size: int = opt(8, "clips per batch")``.

    ``default`` is the field's default; a list, dict or set is copied for each instance (a ``default_factory``), so
    instances never share it. ``help`` and ``argparse_options`` are the field's `option` metadata.
    """
    metadata = option(help, **argparse_options)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(copy.copy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def expand_user(text: str) -> str:
    """`files.user_path` as text: ``~`` and ``~user`` expanded, relative paths left relative."""
    return os.fspath(user_path(text)) if text else text


def expand_named(text: str) -> str:
    """``NAME=PATH`` with its path's ``~`` expanded; text without ``=`` is a plain path."""
    name, sep, path = text.partition("=")
    return f"{name}={expand_user(path)}" if sep else expand_user(text)


def path_expander(kind: Any) -> Optional[Callable[[str], str]]:
    """How the values of a field of value type ``kind`` (`field_type`) are expanded: `PathText` and `NamedPath`
    fields, or None for other fields."""
    return {PathText: expand_user, NamedPath: expand_named}.get(kind)


def expand_paths(cls: Type, values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` of ``cls``'s fields (from a config file) with ``~`` expanded in its path fields."""
    out = dict(values)
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        expand = path_expander(field_type(hints[spec.name]))
        value = out.get(spec.name)
        if expand is None or value is None:
            continue
        out[spec.name] = [expand(str(v)) for v in value] if isinstance(value, (list, tuple)) else expand(str(value))
    return out


def field_type(annotation: Any) -> Any:
    """The value type of a field annotation: ``Optional[int]`` -> ``int``; ``List[str]`` -> ``str``."""
    arguments = getattr(annotation, "__args__", None)
    if arguments:
        return next(a for a in arguments if a is not type(None))
    return annotation


def flags(name: str) -> str:
    """How error messages name the option of field ``name``: both its spellings, as argparse does
    (``--batch-size/--batch_size``), or the one (``--model``)."""
    dashed = "--" + name.replace("_", "-")
    return f"{dashed}/--{name}" if "_" in name else dashed


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
