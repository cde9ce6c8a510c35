"""The ``whisper-rope`` command: its parser and `main`, which runs one subcommand (each a module of this package).

``whisper-rope transcribe AUDIO ...`` takes every option of upstream's ``whisper`` command with its defaults and
meanings, plus the positional-variant options; ``whisper-rope AUDIO ...`` means the same. Its one default that is
not upstream's is ``--compute_type auto`` (int8 on the CPU), as in every subcommand that loads a model this way;
``--compute_type float32`` (with ``--batch_size 1``, the default) is upstream's exact path. Other subcommands:
``convert`` (between checkpoint formats), ``variants`` (list presets and schemes), ``finetune``, ``evaluate`` and
``compare``.

Errors in the library are `WhisperRopeError`s (or ``ValueError``/``OSError`` from bad input); here they become one
line on stderr and a non-zero exit status, never a traceback.
"""

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence

from ..version import __version__
from . import compare, convert, evaluate, finetune, transcribe, variants
from .arguments import ArgumentParser
from .runtime import BAD_INPUT, INTERRUPTED, run_command

#: Each subcommand: (its line in ``whisper-rope --help``, its own --help's description or None, the function adding its
#: options to its parser, the function running it from parsed arguments and returning the exit status).
COMMANDS: Dict[str, tuple] = {
    "transcribe": (transcribe.HELP, None, transcribe.add_transcribe_arguments, transcribe.run_transcribe_cli),
    "convert": (convert.HELP, convert.DESCRIPTION, convert.add_convert_arguments, convert.run_convert_cli),
    "variants": (variants.HELP, None, variants.add_variants_arguments, variants.run_variants_cli),
    "finetune": (finetune.HELP, finetune.DESCRIPTION, finetune.add_finetune_arguments, finetune.run_finetune_cli),
    "evaluate": (evaluate.HELP, evaluate.DESCRIPTION, evaluate.add_evaluate_arguments, evaluate.run_evaluate_cli),
    "compare": (compare.HELP, compare.DESCRIPTION, compare.add_compare_arguments, compare.run_compare_cli),
}
SUBCOMMANDS = tuple(COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``whisper-rope``: ``--version`` and one subparser per subcommand (`COMMANDS`)."""
    parser = ArgumentParser(
        prog="whisper-rope",
        description="Whisper with pluggable positional embeddings. `whisper-rope AUDIO ...` is short for "
        "`whisper-rope transcribe AUDIO ...`.",
    )
    parser.add_argument("--version", action="version", version=f"whisper-rope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, description, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=summary, description=description))
    return parser


def _normalise_argv(argv: Sequence[str]) -> List[str]:
    argv = list(argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "transcribe")
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 2
    run: Callable[[argparse.Namespace], int] = COMMANDS[args.command][3]
    status = run_command(lambda: run(args))
    if status in (BAD_INPUT, INTERRUPTED):
        raise SystemExit(status)  # the way argparse ends, so that a caller sees one way of failing
    return status
