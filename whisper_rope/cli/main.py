"""The ``whisper-rope`` command.

``whisper-rope transcribe AUDIO ...`` takes every option of upstream's ``whisper`` command with its defaults and
meanings, plus the positional-variant options; ``whisper-rope AUDIO ...`` means the same. Other subcommands:
``convert`` (between checkpoint formats) and ``variants`` (list presets and schemes).

Errors in the library are `WhisperRopeError`s (or ``ValueError``/``OSError`` from bad input); here they become one
line on stderr and a non-zero exit status, never a traceback.
"""

import argparse
import io
import logging
import os
import sys
import warnings
from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import numpy as np
from whisper.utils import get_writer

from ..audio import load_audio
from ..errors import one_line
from ..fs.atomic import atomic_write_text
from ..fs.outputs import OutputRecord, check_writable
from ..model import WhisperRope
from ..option_checks import check_load_options, check_transcribe_options
from ..transcription.transcribe import WRITER_OPTIONS, TranscribeOptions, transcribe_many
from ..variants import DECODER_SCHEMES, ENCODER_SCHEMES, PRESETS
from ..version import __version__
from ..weights.convert import ConvertOptions, convert
from ..weights.loading import LoadOptions
from .arguments import ArgumentParser, add_dataclass_arguments, dataclass_from_args
from .compare import add_compare_arguments, run_compare_cli
from .evaluate import DESCRIPTION as EVALUATE_DESCRIPTION
from .evaluate import add_evaluate_arguments, run_evaluate_cli
from .finetune import DESCRIPTION as FINETUNE_DESCRIPTION
from .finetune import add_finetune_arguments, run_finetune_cli
from .runtime import BAD_INPUT, INTERRUPTED, print_error, run_command

SUBCOMMANDS = ("transcribe", "convert", "variants", "finetune", "evaluate", "compare")
#: The formats ``--output_format all`` writes (upstream's writers; each file is ``STEM.FORMAT``).
TRANSCRIPT_FORMATS = ("txt", "vtt", "srt", "tsv", "json")


def _fail(message: str, status: int = BAD_INPUT) -> NoReturn:
    print_error(message)
    raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="whisper-rope",
        description="Whisper with pluggable positional embeddings. `whisper-rope AUDIO ...` is short for "
        "`whisper-rope transcribe AUDIO ...`.",
    )
    parser.add_argument("--version", action="version", version=f"whisper-rope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    transcribe = sub.add_parser("transcribe", help="transcribe audio files (upstream whisper's options)")
    add_dataclass_arguments(transcribe, TranscribeOptions)
    add_dataclass_arguments(transcribe.add_argument_group("loading the model (whisper_rope)"), LoadOptions)

    convert_command = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats",
        description="Convert a faster-whisper (CTranslate2) or Hugging Face model directory to a .pt checkpoint "
        "(upstream's format, readable by whisper.load_model and whisper_rope), or a whisper-variant .pt to a Hugging "
        "Face directory (config.json + model.safetensors); a model name (tiny.en ...) converts to either.",
    )
    add_dataclass_arguments(convert_command, ConvertOptions)

    sub.add_parser("variants", help="list presets and the schemes of each side")

    add_finetune_arguments(
        sub.add_parser(
            "finetune",
            help="fine-tune a checkpoint into a variant",
            description=FINETUNE_DESCRIPTION,
        )
    )
    add_evaluate_arguments(
        sub.add_parser(
            "evaluate",
            help="WER/CER and real-time factor of a model on a manifest",
            description=EVALUATE_DESCRIPTION,
        )
    )
    add_compare_arguments(
        sub.add_parser(
            "compare",
            help="fine-tune and evaluate several variants side by side",
            description="Evaluate a source checkpoint, fine-tune it into each run's variant with identical settings, "
            "evaluate every run on every set, and write results.md, results.csv and plots. A run finished with the "
            "same settings is kept and skipped when the comparison is run again; other settings train and evaluate "
            "anew.",
        )
    )
    return parser


def _normalise_argv(argv: Sequence[str]) -> List[str]:
    argv = list(argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "transcribe")
    return argv


def _run_variants(_: argparse.Namespace) -> int:
    print("presets:")
    for name, spec in PRESETS.items():
        print(f"  {name:28s} {spec}")
    print(f"encoder schemes: {', '.join(ENCODER_SCHEMES)}")
    print(f"decoder schemes: {', '.join(DECODER_SCHEMES)}")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    options = dataclass_from_args(ConvertOptions, args)
    out = convert(options.src, options.dst, progress=options.progress, overwrite=options.force)
    print(f"wrote {out}")
    return 0


def _check_writer_options(options: TranscribeOptions) -> None:
    if not options.word_timestamps:
        for name in WRITER_OPTIONS:
            if getattr(options, name):
                _fail(f"--{name.replace('_', '-')} requires --word-timestamps")
    if options.max_line_count and not options.max_line_width:
        warnings.warn("--max-line-count has no effect without --max-line-width", stacklevel=2)
    if options.max_words_per_line and options.max_line_width:
        warnings.warn("--max-words-per-line has no effect with --max-line-width", stacklevel=2)


def _run_transcribe(args: argparse.Namespace) -> int:
    options = dataclass_from_args(TranscribeOptions, args, keep_none=True)
    loading = dataclass_from_args(LoadOptions, args)
    # Checked before the model is loaded, so that a bad number or output fails in one line, not after a minute of
    # loading.
    check_transcribe_options(options)
    check_load_options(loading)
    _check_writer_options(options)
    _refuse_colliding_transcripts(options)
    check_writable(options.output_dir, "--output_dir")
    record = OutputRecord(options.output_dir, "--output_dir")
    if options.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model = loading.load(options.model, unpadded=options.unpadded)
    if not model.is_multilingual and options.language not in (None, "en", "English"):
        warnings.warn(f"{options.model} is an English-only model; ignoring --language {options.language}", stacklevel=2)
    if not model.is_multilingual:
        options.language = "en"
    os.makedirs(options.output_dir, exist_ok=True)
    failures = 0
    for start in range(0, len(options.audio), options.batch_size):
        loaded, failed = _load_batch(options.audio[start : start + options.batch_size])
        failures += failed
        try:
            results = _transcribe_batch(model, loaded, options)
        except (ValueError, OSError, RuntimeError) as error:
            failures += len(loaded)
            _report(", ".join(path for path, _ in loaded), error)
            continue
        for (path, _), result in zip(loaded, results):
            failures += not _write_transcript(result, path, options, record)
    if failures:
        print(f"whisper-rope: {failures} of {len(options.audio)} files failed", file=sys.stderr)
    return 1 if failures else 0


def _stem(audio: str) -> str:
    """The name of an input's transcripts without the format's extension (upstream's writers name them so)."""
    return os.path.splitext(os.path.basename(audio))[0]


def _refuse_colliding_transcripts(options: TranscribeOptions) -> None:
    """Refuse two inputs whose transcripts would have the same name (``x/clip.flac``, ``y/clip.wav``): the second
    would replace the first's, written by the same run."""
    extension = "txt" if options.output_format == "all" else options.output_format
    first: Dict[str, int] = {}
    for index, path in enumerate(options.audio):
        stem = _stem(path)
        if first.setdefault(stem, index) != index:
            shown = os.path.join(options.output_dir, f"{stem}.{extension}")
            _fail(
                f"{options.audio[first[stem]]} and {path} would both be transcribed to {shown}; transcribe them "
                "into separate --output_dir folders"
            )


def _write_transcript(result: dict, path: str, options: TranscribeOptions, record: OutputRecord) -> bool:
    """Write one file's transcripts, each atomically, unless one of them would replace something this command did not
    write (reported in one line, nothing written), and record them; whether all went well."""
    formats = TRANSCRIPT_FORMATS if options.output_format == "all" else (options.output_format,)
    names = [f"{_stem(path)}.{extension}" for extension in formats]
    foreign = record.foreign(names)
    if foreign:
        shown = "; ".join(f"{os.path.join(options.output_dir, name)} {why}" for name, why in foreign.items())
        _report(path, f"{shown}; not replaced (choose another --output_dir)")
        return False
    written, ok = [], True
    try:
        for extension, name in zip(formats, names):
            text = io.StringIO()
            writer = get_writer(extension, options.output_dir)  # upstream's writer of one format
            writer.write_result(result, text, **{option: getattr(options, option) for option in WRITER_OPTIONS})
            atomic_write_text(os.path.join(options.output_dir, name), text.getvalue())
            written.append(name)
    except OSError as error:
        _report(path, error)
        ok = False
    try:
        if written:
            record.written(written)
    except OSError as error:
        shown = ", ".join(os.path.join(options.output_dir, name) for name in written)
        _report(path, f"{one_line(error, limit=None)}; {shown} not recorded as written by whisper-rope (a later run "
                "will not replace it)")  # fmt: skip
        return False
    return ok


def _load_batch(paths: Sequence[str]) -> Tuple[List[Tuple[str, np.ndarray]], int]:
    """(path, waveform) of the files that could be read, and how many could not (each reported in one line)."""
    loaded, failed = [], 0
    for path in paths:
        try:
            loaded.append((path, load_audio(path)))
        except (ValueError, OSError) as error:
            failed += 1
            _report(path, error)
    return loaded, failed


def _transcribe_batch(
    model: WhisperRope, loaded: List[Tuple[str, np.ndarray]], options: TranscribeOptions
) -> List[dict]:
    kwargs = options.transcribe_kwargs()
    if options.batch_size == 1:
        return [model.transcribe(audio, **kwargs) for _, audio in loaded]  # upstream's, after warn_outside
    paths, waveforms = [path for path, _ in loaded], [audio for _, audio in loaded]
    return transcribe_many(model, waveforms, options.batch_size, names=paths, **kwargs)


def _report(what: str, error: BaseException) -> None:
    print_error(f"{what}: {one_line(error, limit=None)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {
        "transcribe": _run_transcribe,
        "convert": _run_convert,
        "variants": _run_variants,
        "finetune": run_finetune_cli,
        "evaluate": run_evaluate_cli,
        "compare": run_compare_cli,
    }
    if args.command is None:
        parser.print_help()
        return 2
    status = run_command(lambda: commands[args.command](args))
    if status in (BAD_INPUT, INTERRUPTED):
        raise SystemExit(status)  # the way argparse and `_fail` end, so a caller sees one way of failing
    return status
