"""``whisper-rope evaluate``: its options (`EvaluateCommand`, `LoadOptions`, `EvaluationOptions`), the run, the
written summary and rows; also ``python -m whisper_rope.evaluation``."""

import argparse
from dataclasses import dataclass
from typing import Optional, Sequence

from ..evaluation.evaluate import EvaluationOptions, evaluate, output_paths
from ..fields import PathText, opt
from ..fs.outputs import claim_files, refuse_overlap
from ..weights.loading import MODEL_HELP, LoadOptions
from .arguments import add_dataclass_arguments, dataclass_from_args, standalone_main

HELP = "WER/CER and real-time factor of a model on a manifest"
# The command's --help description, the same for `whisper-rope evaluate` and `python -m whisper_rope.evaluation`.
DESCRIPTION = (
    "Decode every clip of a manifest in batches and score it: WER and CER (with substitutions, deletions, "
    "insertions), real-time factor, per-utterance JSONL."
)


DATA_HELP = (
    "the clips to evaluate: a manifest (JSONL, CSV or TSV with 'audio' and 'text') or a folder of audio files with "
    ".txt transcripts"
)


@dataclass
class EvaluateCommand:
    """The ``whisper-rope evaluate`` command's own options; the model loads with `LoadOptions` and decodes with
    `EvaluationOptions`."""

    model: Optional[PathText] = opt(None, MODEL_HELP, required=True)
    data: Optional[PathText] = opt(None, DATA_HELP, required=True)
    output: Optional[PathText] = opt(
        None,
        "write the summary as JSON here and the per-utterance rows as JSON lines next to it (same name, suffix "
        ".jsonl); a file there that whisper-rope did not write is never replaced",
        flags=["-o"],
    )
    progress: bool = opt(True, "show a progress bar")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``whisper-rope evaluate``: `EvaluateCommand`, `LoadOptions` and `EvaluationOptions` fields
    (``--batch-size``, also ``--batch_size``; booleans as ``--skip-invalid [BOOL]``/``--no-skip-invalid``)."""
    for options in (EvaluateCommand, LoadOptions, EvaluationOptions):
        add_dataclass_arguments(parser, options)
    return parser


def options_from_args(args: argparse.Namespace) -> EvaluationOptions:
    """The `EvaluationOptions` of parsed ``whisper-rope evaluate`` arguments (validated)."""
    return dataclass_from_args(EvaluationOptions, args).validate()


def run_evaluate_cli(args: argparse.Namespace) -> int:
    """Run ``whisper-rope evaluate`` from parsed arguments: print the summary, write ``--output``; exit status 0."""
    command = dataclass_from_args(EvaluateCommand, args)
    options = options_from_args(args)
    loading = dataclass_from_args(LoadOptions, args).validate()  # before the outputs are claimed
    record = None
    if command.output:  # before the model loads: an output never replaces an input, nor a file we did not write
        paths = output_paths(command.output)
        for path, what in zip(paths, ("--output", "--output's per-utterance file")):
            refuse_overlap(path, {"--data": command.data, "--model": command.model}, what)
        record = claim_files(paths, "--output")
    model = loading.load(command.model, unpadded=options.unpadded, progress=command.progress)
    result = evaluate(model, command.data, options, progress=command.progress)
    print(result.summary())
    if record is not None:
        try:
            summary_path, rows_path = result.write(command.output)
            print(f"wrote {summary_path} and {rows_path}")
        finally:  # what was written, also when the second write failed: a later run replaces it
            record.written([path.name for path in paths])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m whisper_rope.evaluation ...`` (`whisper_rope.evaluation.__main__` runs this): the evaluate command
    on its own."""
    return standalone_main("whisper-rope evaluate", DESCRIPTION, add_evaluate_arguments, run_evaluate_cli, argv)
