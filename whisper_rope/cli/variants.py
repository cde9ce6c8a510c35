"""``whisper-rope variants``: the presets and the schemes of each side."""

import argparse

from ..variants import DECODER_SCHEMES, ENCODER_SCHEMES, PRESETS

HELP = "list presets and the schemes of each side"


def add_variants_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command takes no options."""
    return parser


def run_variants_cli(_: argparse.Namespace) -> int:
    """Print every preset (name and ``ENCODER/DECODER``), then each side's schemes; exit status 0."""
    print("presets:")
    for name, spec in PRESETS.items():
        print(f"  {name:28s} {spec}")
    print(f"encoder schemes: {', '.join(ENCODER_SCHEMES)}")
    print(f"decoder schemes: {', '.join(DECODER_SCHEMES)}")
    return 0
