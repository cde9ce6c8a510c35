"""``whisper-rope compare``: its options (`CompareConfig`, over an optional JSON ``--config`` file) and the run."""

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict

from ..experiments.compare import CompareConfig, compare
from .arguments import add_dataclass_arguments, dataclass_from_args

HELP = "fine-tune and evaluate several variants side by side"
DESCRIPTION = (
    "Evaluate a source checkpoint, fine-tune it into each run's variant with identical settings, evaluate every run "
    "on every set, and write results.md, results.csv and plots. A run finished with the same settings is kept and "
    "skipped when the comparison is run again; other settings train and evaluate anew."
)


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="JSON file with any of the options below (command-line options override it)")
    # No defaults here: an option left out keeps the config file's value, or the field's default.
    return add_dataclass_arguments(parser, CompareConfig, defaults=False)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    values: Dict[str, Any] = {}
    if args.config:
        try:
            values = json.loads(Path(args.config).expanduser().read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read compare config {args.config!r}: {error}") from None
        unknown = set(values) - {f.name for f in fields(CompareConfig)}
        if unknown:
            raise ValueError(f"compare config {args.config!r}: unknown keys {', '.join(sorted(unknown))}")
    return dataclass_from_args(CompareConfig, args, base=values)


def run_compare_cli(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    compare(config)
    output = Path(config.output)
    print((output / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {output / 'results.md'}, {output / 'results.csv'} and plots")
    return 0
