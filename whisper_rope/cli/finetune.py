"""``whisper-rope finetune``: options from `FinetuneConfig` (and a recipe's defaults), the run, a final evaluation.

Options are built with unset values left at None, so that a ``--recipe`` fills exactly the options the command line
did not give; every option's help still shows the default of `FinetuneConfig`.
"""

import argparse
import logging
import os
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from ..experiments.report import final_evaluation
from ..training.config import FinetuneConfig
from ..training.holdout import MAX_DEFAULT_HOLDOUT
from ..training.loop import finetune, finished_differences, finished_run
from ..training.recipes import RECIPES, recipe_defaults
from ..training.state import MODEL_FILE
from .arguments import add_dataclass_arguments, dataclass_from_args, standalone_main

HELP = "fine-tune a checkpoint into a variant"
# The command's --help description, the same for `whisper-rope finetune` and `python -m whisper_rope.training`.
DESCRIPTION = (
    "Fine-tune pretrained or fine-tuned weights into a positional variant on a manifest or a folder of audio with "
    ".txt transcripts; under torchrun, with DistributedDataParallel."
)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per `FinetuneConfig` field: ``--batch-size`` (also ``--batch_size``); booleans as
    ``--flag``/``--no-flag``. Unset options parse as None (the recipe's or the field's default applies). The help
    ends with the options each ``--recipe`` sets."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the recipes below keep their lines
    if parser.description:
        parser.description = textwrap.fill(" ".join(parser.description.split()), _HELP_WIDTH)
    parser.epilog = recipes_help()
    return add_dataclass_arguments(parser, FinetuneConfig, defaults=False)


_HELP_WIDTH = 100


def recipes_help() -> str:
    """Each recipe as the options it sets, for ``finetune --help``."""
    lines = ["recipes: --recipe NAME sets these options (an option given on the command line wins):"]
    for name, recipe in RECIPES.items():
        shown = [_as_option(key, value) for key, value in recipe.defaults.items()]
        steps = recipe.defaults["steps"]
        for key, share in recipe.shares.items():  # step counts that follow --steps
            shown.append(
                f"{_as_option(key, round(share * steps))} ({share:.1%} of --steps)".replace(" ", _KEEP_TOGETHER)
            )
        options = " ".join(shown)
        text = textwrap.fill(
            f"{name}: {options}", _HELP_WIDTH, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False
        )
        lines.append(text.replace(_KEEP_TOGETHER, " "))
    return "\n".join(lines)


_KEEP_TOGETHER = "\xa0"  # joins an option to its value: textwrap breaks lines only at ASCII whitespace


def _as_option(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if name == "eval_holdout" and value is None:
        return f"{flag} (a fifth of the clips, at most {MAX_DEFAULT_HOLDOUT})".replace(" ", _KEEP_TOGETHER)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag}{_KEEP_TOGETHER}{value}"


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The `FinetuneConfig` of parsed ``whisper-rope finetune`` arguments: given options, then the recipe's values
    (its step counts scaled to a given --steps), then the field defaults (validated)."""
    defaults = recipe_defaults(getattr(args, "recipe", None), getattr(args, "steps", None))
    return dataclass_from_args(FinetuneConfig, args, defaults).validate()


def run_finetune_cli(args: argparse.Namespace) -> int:
    """Run ``whisper-rope finetune`` from parsed arguments; returns the exit status."""
    config = config_from_args(args)
    output = Path(config.output).expanduser()
    if config.resume is None and finished_differences(output, config) == {}:  # nothing to train, nothing to load
        step = finished_run(output)["step"]
        print(f"{output} already holds this run, finished at step {step}; final model {output / MODEL_FILE}")
        return 0
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = finetune(config=config)
    if rank != 0:
        return 0
    summary = f"trained {result.steps} steps; final model {result.model_path}"
    if result.best_wer is not None:
        summary += f"; best WER {100 * result.best_wer:.2f}% at step {result.best_step} ({result.output / 'best'})"
    print(summary)
    if config.recipe is not None:
        report = final_evaluation(result, config)
        if report is not None:
            print(report)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m whisper_rope.training ...``: the finetune command on its own (also under torchrun)."""
    return standalone_main("whisper-rope finetune", DESCRIPTION, add_finetune_arguments, run_finetune_cli, argv)
