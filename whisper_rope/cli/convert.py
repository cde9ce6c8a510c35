"""``whisper-rope convert``: its options (`ConvertOptions`) and the run of `weights.convert.convert`."""

import argparse
from dataclasses import dataclass

from ..fields import PathText, opt
from ..weights.convert import convert
from .arguments import add_dataclass_arguments, dataclass_from_args

HELP = "convert a checkpoint between formats"
DESCRIPTION = (
    "Convert a faster-whisper (CTranslate2) or Hugging Face model directory to a .pt checkpoint (upstream's format, "
    "readable by whisper.load_model and whisper_rope), or a whisper-variant .pt to a Hugging Face directory "
    "(config.json + model.safetensors); a model name (tiny.en ...) converts to either."
)


@dataclass
class ConvertOptions:
    """The ``whisper-rope convert`` command: the arguments of `convert`."""

    src: PathText = opt(
        "",
        "CTranslate2 directory, Hugging Face directory, .pt file, or a model name (tiny.en ... large-v3-turbo)",
        positional=True,
    )
    dst: PathText = opt(
        "",
        "output .pt file (from a directory or a model name) or output directory (from a .pt or a model name)",
        positional=True,
    )
    force: bool = opt(
        False, "replace an existing destination written by convert (a checkpoint, or an export directory)"
    )
    progress: bool = opt(True, "show a progress bar")


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``whisper-rope convert``: `ConvertOptions` fields."""
    return add_dataclass_arguments(parser, ConvertOptions)


def run_convert_cli(args: argparse.Namespace) -> int:
    """Run ``whisper-rope convert`` from parsed arguments: convert, print where it wrote; exit status 0."""
    options = dataclass_from_args(ConvertOptions, args)
    out = convert(options.src, options.dst, progress=options.progress, overwrite=options.force)
    print(f"wrote {out}")
    return 0
