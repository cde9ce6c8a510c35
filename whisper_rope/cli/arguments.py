"""Command-line options built from the dataclass of a job (declared with `whisper_rope.fields`), so that the Python
API and the CLI cannot drift. Only the command line imports this module (argparse, the parser's one-line errors).

Every subcommand's options are built this way, and every option is spelled and behaves alike:

* a field ``batch_size`` is ``--batch-size`` and ``--batch_size`` (upstream whisper's spelling);
* it is declared with `fields.opt` (its default, help text and argparse keywords in one call); its ``metadata``
  (`option`) holds the help text and any other ``argparse.add_argument`` keywords (``choices``,
  ``type``, ``nargs``, extra ``flags`` such as ``-o``, ``required``), or ``positional=True`` for an argument;
* a field typed `PathText` (or ``Optional``/``List`` of it) names a file or folder, and its ``~`` is expanded;
  `NamedPath`, ``NAME=PATH`` or a plain path, likewise;
* a boolean accepts a bare flag, an explicit value and a negation: ``--fp16``, ``--fp16 False`` (upstream's form),
  ``--fp16=no``, ``--no-fp16`` (also ``--no_fp16``);
* a number declares the values it accepts (``bounds=Bounds.integers(1, 64)``): its help states them and
  the dataclass's ``validate`` (`fields.check_bounds`) refuses anything else in one line naming the option;
* the help shows each default once.
"""

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Type

from ..errors import one_line
from ..fields import expand_paths, field_type, path_expander
from .runtime import BAD_INPUT, print_error, run_command

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


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
    expand = path_expander(kind)
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
    """One job as its own command (``python -m whisper_rope.training``): parse, and run it through
    `runtime.run_command` (one-line errors and warnings, Ctrl-C as status 130), as `main.main` does. Returns the exit
    status."""
    parser = add_arguments(ArgumentParser(prog=prog, description=description))
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))
