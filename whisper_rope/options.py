"""Command-line options built from the dataclass of a job, so that the Python API and the CLI cannot drift.

Each field becomes ``--field-name`` (also ``--field_name``, the spelling of upstream whisper's options); the field's
``metadata`` holds the help text and any other ``argparse.add_argument`` keywords (``choices``, ``nargs``, extra
``flags``); booleans become ``--flag``/``--no-flag``.
"""

import argparse
import dataclasses
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Type

from .errors import one_line


def option(help: str, **argparse_options: Any) -> Dict[str, Any]:
    """A dataclass field's ``metadata``: its help text and any other ``argparse.add_argument`` keywords."""
    return {"help": help, **argparse_options}


def field_type(annotation: Any) -> Any:
    """The value type of a field annotation: ``Optional[int]`` -> ``int``; ``List[str]`` -> ``str``."""
    arguments = getattr(annotation, "__args__", None)
    if arguments:
        return next(a for a in arguments if a is not type(None))
    return annotation


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: Type, defaults: bool = True, skip: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """One option per field of the dataclass ``cls``.

    defaults: True gives each option the field's default; False leaves unset options at None (for callers that merge
    them over another source, such as a config file).
    """
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        meta = dict(spec.metadata)
        kind = field_type(spec.type)
        names = list(meta.pop("flags", ())) + [f"--{spec.name.replace('_', '-')}"]
        default = _default(spec) if defaults else None
        options: Dict[str, Any] = {"dest": spec.name, "default": default, "help": meta.pop("help", "")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            if "_" in spec.name:
                names.append(f"--{spec.name}")
            options["type"] = meta.pop("type", kind)
            if "choices" not in meta:
                options["metavar"] = spec.name.upper()
            if default is not None:
                options["help"] += " (default: %(default)s)"
        options.update(meta)
        parser.add_argument(*names, **options)
    return parser


def dataclass_from_args(cls: Type, args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> Any:
    """An instance of ``cls`` from parsed options; options left at None keep ``base``'s value or the default."""
    values = dict(base or {})
    names = {spec.name for spec in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
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
    """One job as its own command (``python -m whisper_rope.train``): parse, run, and turn a bad-input error into
    one line on stderr and exit status 2."""
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=description))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"whisper-rope: error: {one_line(error, limit=None)}", file=sys.stderr)
        return 2
