"""Command-line options built from the dataclass of a job, so that the Python API and the CLI cannot drift.

Every subcommand declares its options this way, and every option is spelled and behaves alike:

* a field ``batch_size`` is ``--batch-size`` and ``--batch_size`` (upstream whisper's spelling);
* it is declared with `opt` (its default, help text and argparse keywords in one call); its ``metadata``
  (`option`) holds the help text and any other ``argparse.add_argument`` keywords (``choices``,
  ``type``, ``nargs``, extra ``flags`` such as ``-o``, ``required``), or ``positional=True`` for an argument;
* a field typed `PathText` (or ``Optional``/``List`` of it) names a file or folder, and its ``~`` is expanded;
  `NamedPath`, ``NAME=PATH`` or a plain path, likewise;
* a boolean accepts a bare flag, an explicit value and a negation: ``--fp16``, ``--fp16 False`` (upstream's form),
  ``--fp16=no``, ``--no-fp16`` (also ``--no_fp16``);
* a number declares the values it accepts (``bounds=Bounds.integers(1, 64)``): its help states them and
  `option_checks.check_bounds` refuses anything else in one line naming the option;
* the help shows each default once.
"""

import argparse
import copy
import dataclasses
import functools
import math
import numbers
import os
import sys
import typing
from typing import Any, Callable, Dict, List, NewType, NoReturn, Optional, Sequence, Type

from .errors import BAD_INPUT, one_line, print_error, run_command
from .files import user_path

#: The type of an option that names a file or folder: text (``str`` at run time) whose ``~`` is expanded.
PathText = NewType("PathText", str)
#: The type of an option that is ``NAME=PATH`` or a plain path: text whose path's ``~`` is expanded.
NamedPath = NewType("NamedPath", str)

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The numbers an option accepts: whole numbers (``whole``) or finite ones, from ``low`` to ``high`` (None: no
    bound on that side; ``low_open``/``high_open`` exclude the bound itself). Declared as a field's ``bounds``
    metadata (``opt(5, "beams", bounds=Bounds.integers(1, 64))``): `option_checks.check_bounds` refuses other values
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


def _expander(kind: Any) -> Optional[Callable[[str], str]]:
    """How the values of a field of value type ``kind`` (`field_type`) are expanded: `PathText` and `NamedPath`
    fields, or None for other fields."""
    return {PathText: expand_user, NamedPath: expand_named}.get(kind)


def expand_paths(cls: Type, values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` of ``cls``'s fields (from a config file) with ``~`` expanded in its path fields."""
    out = dict(values)
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        expand = _expander(field_type(hints[spec.name]))
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


def to_bool(text: str) -> bool:
    """``True``/``yes``/``1``/``on`` or ``False``/``no``/``0``/``off``, in any case."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class BooleanFlag(argparse.Action):
    """``--flag`` (True) or ``--flag VALUE`` (`to_bool`); `add_dataclass_arguments` adds ``--no-flag`` beside it."""

    def __init__(self, option_strings: List[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs="?", const=True, type=to_bool, metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, value)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reading a `BooleanFlag` given bare before an argument as a bare flag
    (``--unpadded a.flac``: the flag is True and ``a.flac`` is an input, not the flag's value). Its subcommands'
    parsers are of this class too."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        flags = {name for action in self._actions if isinstance(action, BooleanFlag) for name in action.option_strings}
        for i, token in enumerate(args[:-1]):
            if token == "--":
                break
            if token in flags and str(args[i + 1]).lower() not in _TRUE + _FALSE:
                args[i] = f"{token}=true"
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """argparse's usage error as one line: ``whisper-rope: error: MESSAGE (see PROG --help)``, exit status 2."""
        print_error(f"{one_line(message, limit=None)} (see {self.prog} --help)")
        self.exit(BAD_INPUT)


def flags(name: str) -> str:
    """How error messages name the option of field ``name``: both its spellings, as argparse does
    (``--batch-size/--batch_size``), or the one (``--model``)."""
    dashed = "--" + name.replace("_", "-")
    return f"{dashed}/--{name}" if "_" in name else dashed


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: Type, defaults: bool = True, skip: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """One option (or positional argument) per field of the dataclass ``cls``.

    defaults: True gives each option the field's default; False leaves unset options at None (for callers that merge
    them over another source, such as a config file).
    """
    hints = typing.get_type_hints(cls)  # the annotations' types, also under `from __future__ import annotations`
    for spec in dataclasses.fields(cls):
        if spec.name not in skip:
            _add_field(parser, spec, field_type(hints[spec.name]), defaults)
    return parser


def _add_field(parser: argparse.ArgumentParser, spec: dataclasses.Field, kind: type, defaults: bool) -> None:
    meta = dict(spec.metadata)
    default = _default(spec) if defaults else None
    options: Dict[str, Any] = {"help": meta.pop("help", "")}
    positional = meta.pop("positional", False)
    shown = _default(spec)  # the value an option left out takes, whether or not ``defaults`` sets it here
    notes = [str(meta.pop("bounds"))] if "bounds" in meta else []
    if shown is not None and shown != [] and not positional and "default" not in options["help"].lower():
        notes.append(f"default: {shown}")
    if notes:
        options["help"] += f" ({'; '.join(notes)})".replace("%", "%%")
    expand = _expander(kind)
    if expand is not None:
        meta["type"] = expand  # no shell expands the ~ of --option=~/x, nor one a program passes on
    if positional:
        options.update(type=meta.pop("type", kind), **meta)
        parser.add_argument(spec.name, **options)
        return
    names = [f"--{spec.name.replace('_', '-')}"] + ([f"--{spec.name}"] if "_" in spec.name else [])
    names += list(meta.pop("flags", ()))
    options.update(dest=spec.name, default=default)
    if kind is bool:
        options["action"] = BooleanFlag
    else:
        options["type"] = meta.pop("type", kind)
        if "choices" not in meta:
            options["metavar"] = spec.name.upper()
    options.update(meta)
    parser.add_argument(*names, **options)
    if kind is bool:
        negations = [f"--no-{names[0][2:]}", f"--no_{spec.name}"]
        parser.add_argument(
            *negations,
            dest=spec.name,
            action="store_false",
            default=argparse.SUPPRESS,
            help=f"same as {names[0]} False",
        )


def dataclass_from_args(
    cls: Type, args: argparse.Namespace, base: Optional[Dict[str, Any]] = None, keep_none: bool = False
) -> Any:
    """An instance of ``cls`` from parsed options. Options left at None keep ``base``'s value (its path fields with
    ``~`` expanded) or the field's default (for parsers built with ``defaults=False``); with ``keep_none``, None is a
    value like any other (upstream's ``--best_of None``)."""
    values = expand_paths(cls, base or {})
    names = {spec.name for spec in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names and (keep_none or v is not None)})
    return cls(**values)


def _default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return None if spec.default is dataclasses.MISSING else spec.default


def standalone_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: Optional[Sequence[str]] = None,
) -> int:
    """One job as its own command (``python -m whisper_rope.train``): parse, and run it through
    `errors.run_command` (one-line errors and warnings, Ctrl-C as status 130), as `cli.main` does. Returns the
    exit status."""
    parser = add_arguments(ArgumentParser(prog=prog, description=description))
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))
