"""The ``whisper-rope`` command.

``whisper-rope transcribe AUDIO ...`` takes every option of upstream's ``whisper`` command with its defaults and
meanings, plus the positional-variant options; ``whisper-rope AUDIO ...`` means the same. Other subcommands:
``convert`` (between checkpoint formats) and ``variants`` (list presets and schemes).

Errors in the library are `WhisperRopeError`s (or ``ValueError``/``OSError`` from bad input); here they become one
line on stderr and a non-zero exit status, never a traceback.
"""

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

import numpy as np
import torch
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from whisper.transcribe import transcribe
from whisper.utils import get_writer, optional_float, optional_int, str2bool

from .audio import load_audio
from .errors import one_line
from .evaluation.compare import add_compare_arguments, run_compare_cli
from .evaluation.evaluate import add_evaluate_arguments, run_evaluate_cli
from .training.loop import add_finetune_arguments, run_finetune_cli
from .transcribe import transcribe_many
from .variants import DECODER_SCHEMES, ENCODER_SCHEMES, PRESETS, parse_variant
from .version import __version__
from .weights.convert import convert
from .weights.loading import load_model

SUBCOMMANDS = ("transcribe", "convert", "variants", "finetune", "evaluate", "compare")
WORD_OPTIONS = ("highlight_words", "max_line_count", "max_line_width", "max_words_per_line")


def _fail(message: str, status: int = 2) -> NoReturn:
    print(f"whisper-rope: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream ``whisper``'s options (same names, defaults and meanings) and ours."""
    add = parser.add_argument
    add("audio", nargs="+", type=str, help="audio files to transcribe")
    add(
        "--model",
        default="turbo",
        help="model name (tiny.en ... large-v3-turbo, turbo), a .pt checkpoint "
        "(upstream's or whisper_rope's), or a faster-whisper / Hugging Face model directory",
    )
    add("--model_dir", default=None, help="where upstream model downloads are cached (default ~/.cache/whisper)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="PyTorch device to run on")
    add("--output_dir", "-o", default=".", help="directory for the output files")
    add(
        "--output_format",
        "-f",
        default="all",
        choices=["txt", "vtt", "srt", "tsv", "json", "all"],
        help="output format; 'all' writes every format",
    )
    add("--verbose", type=str2bool, default=True, help="print segments and progress as they are decoded")
    add(
        "--task",
        default="transcribe",
        choices=["transcribe", "translate"],
        help="'transcribe' keeps the spoken language, 'translate' produces English",
    )
    add(
        "--language",
        default=None,
        choices=sorted(LANGUAGES) + sorted(k.title() for k in TO_LANGUAGE_CODE),
        help="spoken language; detected when not given (English-only models always use English)",
    )
    add("--temperature", type=float, default=0, help="sampling temperature of the first attempt")
    add("--best_of", type=optional_int, default=5, help="candidates sampled when the temperature is above zero")
    add("--beam_size", type=optional_int, default=5, help="beams for beam search at temperature zero")
    add("--patience", type=float, default=None, help="beam-search patience factor (1.0 = conventional beam search)")
    add(
        "--length_penalty",
        type=float,
        default=None,
        help="length-penalty exponent alpha for ranking beams; plain length normalisation when not given",
    )
    add(
        "--suppress_tokens",
        default="-1",
        help="comma-separated token ids never to emit; -1 means most special symbols except common punctuation",
    )
    add("--initial_prompt", default=None, help="text given to the model as the context of the first window")
    add("--carry_initial_prompt", type=str2bool, default=False, help="give the initial prompt to every window")
    add(
        "--condition_on_previous_text",
        type=str2bool,
        default=True,
        help="give each window the previous window's text as context (consistent, but can get stuck in loops)",
    )
    add("--fp16", type=str2bool, default=True, help="run in half precision (falls back to fp32 on the CPU)")
    add(
        "--temperature_increment_on_fallback",
        type=optional_float,
        default=0.2,
        help="temperature step of the retries when a window fails the thresholds below",
    )
    add(
        "--compression_ratio_threshold",
        type=optional_float,
        default=2.4,
        help="a window whose text gzip-compresses better than this ratio is retried",
    )
    add(
        "--logprob_threshold",
        type=optional_float,
        default=-1.0,
        help="a window whose mean token log-probability is below this is retried",
    )
    add(
        "--no_speech_threshold",
        type=optional_float,
        default=0.6,
        help="a window is silence when P(no speech) is above this and the log-probability test failed",
    )
    add(
        "--word_timestamps",
        type=str2bool,
        default=False,
        help="compute word-level timestamps (cross-attention alignment)",
    )
    add("--prepend_punctuations", default="\"'“¿([{-", help="with word timestamps: punctuation joined to the next word")
    add(
        "--append_punctuations",
        default="\"'.。,，!！?？:：”)]}、",
        help="with word timestamps: punctuation joined to the previous word",
    )
    add(
        "--highlight_words",
        type=str2bool,
        default=False,
        help="(needs --word_timestamps True) underline the spoken word in srt/vtt",
    )
    add(
        "--max_line_width",
        type=optional_int,
        default=None,
        help="(needs --word_timestamps True) characters per subtitle line",
    )
    add(
        "--max_line_count",
        type=optional_int,
        default=None,
        help="(needs --word_timestamps True) lines per subtitle segment",
    )
    add(
        "--max_words_per_line",
        type=optional_int,
        default=None,
        help="(needs --word_timestamps True; ignored with --max_line_width) words per subtitle segment",
    )
    add("--threads", type=optional_int, default=0, help="torch CPU threads (0 keeps torch's default)")
    add(
        "--batch_size",
        type=int,
        default=1,
        help="decode up to this many files of at most 30 s together (same results as one by one; longer files are "
        "transcribed alone)",
    )
    add("--clip_timestamps", default="0", help="comma-separated start,end,... seconds of the spans to transcribe")
    add(
        "--hallucination_silence_threshold",
        type=optional_float,
        default=None,
        help="(needs --word_timestamps True) skip silences longer than this many seconds around suspected "
        "hallucinations",
    )

    group = parser.add_argument_group("positional variant (whisper_rope)")
    group.add_argument(
        "--variant",
        default=None,
        help=f"preset ({', '.join(PRESETS)}) or ENCODER/DECODER with encoder schemes "
        f"{{{', '.join(ENCODER_SCHEMES)}}} and decoder schemes {{{', '.join(DECODER_SCHEMES)}}}; "
        "default: the checkpoint's own variant (whisper for upstream weights)",
    )
    group.add_argument(
        "--rotary_theta",
        type=float,
        default=None,
        help="RoPE base; default: the checkpoint's (10000 for new rotary variants)",
    )
    group.add_argument(
        "--unpadded",
        type=str2bool,
        default=None,
        help="encode only the real frames of each window (rotary-only encoders); default: True for "
        "checkpoints fine-tuned unpadded, else False",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-rope",
        description="Whisper with pluggable positional embeddings. `whisper-rope AUDIO ...` is short for "
        "`whisper-rope transcribe AUDIO ...`.",
    )
    parser.add_argument("--version", action="version", version=f"whisper-rope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    transcribe = sub.add_parser(
        "transcribe",
        help="transcribe audio files (upstream whisper's options)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_transcribe_arguments(transcribe)

    convert = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats",
        description="Convert a faster-whisper (CTranslate2) or Hugging Face model directory to a .pt checkpoint "
        "(upstream's format, readable by whisper.load_model and whisper_rope), or a whisper-variant .pt to a Hugging "
        "Face directory (config.json + model.safetensors).",
    )
    convert.add_argument("src", help="CTranslate2 directory, Hugging Face directory, or .pt file")
    convert.add_argument("dst", help="output .pt file (from a directory) or output directory (from a .pt)")
    convert.add_argument("--force", action="store_true", help="replace an existing destination")
    convert.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")

    sub.add_parser("variants", help="list presets and the schemes of each side")

    add_finetune_arguments(
        sub.add_parser(
            "finetune",
            help="fine-tune a checkpoint into a variant",
            description="Fine-tune pretrained or fine-tuned weights into a positional variant on a manifest or a "
            "folder of audio with .txt transcripts; under torchrun, with DistributedDataParallel.",
        )
    )
    add_evaluate_arguments(
        sub.add_parser(
            "evaluate",
            help="WER/CER and real-time factor of a model on a manifest",
            description="Decode every clip of a manifest in batches and score it: WER and CER (with substitutions, "
            "deletions, insertions), real-time factor, per-utterance JSONL.",
        )
    )
    add_compare_arguments(
        sub.add_parser(
            "compare",
            help="fine-tune and evaluate several variants side by side",
            description="Evaluate a source checkpoint, fine-tune it into each run's variant with identical settings, "
            "evaluate every run on every set, and write results.md, results.csv and plots. Finished runs are kept and "
            "skipped when the comparison is run again.",
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
    out = convert(args.src, args.dst, progress=args.progress, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def _temperatures(args: Dict[str, object]) -> Sequence[float]:
    start = args.pop("temperature")
    increment = args.pop("temperature_increment_on_fallback")
    if increment is None:
        return (start,)
    return tuple(np.arange(start, 1.0 + 1e-6, increment))


def _run_transcribe(args: argparse.Namespace) -> int:
    options = dict(vars(args))
    options.pop("command")
    audio_paths: List[str] = options.pop("audio")
    model_name = options.pop("model")
    model_dir = options.pop("model_dir")
    output_dir = options.pop("output_dir")
    output_format = options.pop("output_format")
    device = options.pop("device")
    variant = options.pop("variant")
    rotary_theta = options.pop("rotary_theta")
    unpadded = options.pop("unpadded")

    if variant is not None:
        parse_variant(variant)  # a bad variant is reported before any weights are looked for
    if not options["word_timestamps"]:
        for option in WORD_OPTIONS:
            if options[option]:
                _fail(f"--{option} requires --word_timestamps True")
    if options["max_line_count"] and not options["max_line_width"]:
        warnings.warn("--max_line_count has no effect without --max_line_width")
    if options["max_words_per_line"] and options["max_line_width"]:
        warnings.warn("--max_words_per_line has no effect with --max_line_width")
    temperature = _temperatures(options)
    threads = options.pop("threads")
    if threads and threads > 0:
        torch.set_num_threads(threads)
    if options["verbose"]:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model = load_model(
        model_name,
        variant=variant,
        device=device,
        download_root=model_dir,
        rotary_theta=rotary_theta,
        unpadded=unpadded,
    )
    if not model.is_multilingual and options["language"] not in (None, "en", "English"):
        warnings.warn(f"{model_name} is an English-only model; ignoring --language {options['language']}")
    if not model.is_multilingual:
        options["language"] = "en"

    os.makedirs(output_dir, exist_ok=True)
    writer = get_writer(output_format, output_dir)
    writer_options = {name: options.pop(name) for name in WORD_OPTIONS}
    batch_size = options.pop("batch_size")
    if batch_size < 1:
        _fail(f"--batch_size must be at least 1, got {batch_size}")
    failures = 0
    for start in range(0, len(audio_paths), batch_size):
        loaded = []  # (path, waveform) of the files of this batch that could be read
        for path in audio_paths[start : start + batch_size]:
            try:
                loaded.append((path, load_audio(path)))
            except (ValueError, OSError) as error:
                failures += 1
                print(f"whisper-rope: error: {path}: {one_line(error, limit=None)}", file=sys.stderr)
        try:
            waveforms = [audio for _, audio in loaded]
            if batch_size == 1:
                results = [transcribe(model, audio, temperature=temperature, **options) for audio in waveforms]
            else:
                results = transcribe_many(model, waveforms, batch_size, temperature=temperature, **options)
        except (ValueError, OSError, RuntimeError) as error:
            failures += len(loaded)
            print(
                f"whisper-rope: error: {', '.join(p for p, _ in loaded)}: {one_line(error, limit=None)}",
                file=sys.stderr,
            )
            continue
        for (path, _), result in zip(loaded, results):
            try:
                writer(result, path, **writer_options)
            except OSError as error:
                failures += 1
                print(f"whisper-rope: error: {path}: {one_line(error, limit=None)}", file=sys.stderr)
    if failures:
        print(f"whisper-rope: {failures} of {len(audio_paths)} files failed", file=sys.stderr)
    return 1 if failures else 0


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
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (ValueError, OSError, RuntimeError) as error:
        _fail(one_line(error, limit=None))


if __name__ == "__main__":
    sys.exit(main())
