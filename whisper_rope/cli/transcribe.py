"""``whisper-rope transcribe``: upstream ``whisper``'s options (`TranscribeOptions`) and how the model loads
(`LoadOptions`), the run in batches (`transcribe_many`), and each input's transcripts written by upstream's writers,
each atomically, never over a file this command did not write (`OutputRecord`)."""

import argparse
import io
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from whisper.utils import get_writer, optional_float, optional_int

from ..audio import load_audio
from ..errors import OptionError, one_line
from ..fields import BATCH, BEAMS, Bounds, PathText, check_bounds, flags, opt
from ..fs.atomic import atomic_write_text
from ..fs.outputs import OutputRecord, check_writable
from ..model import WhisperRope
from ..transcription.transcribe import transcribe_many
from ..weights.loading import MODEL_HELP, LoadOptions
from .arguments import add_dataclass_arguments, dataclass_from_args
from .runtime import print_error

HELP = "transcribe audio files (upstream whisper's options)"
#: The formats ``--output_format all`` writes (upstream's writers; each file is ``STEM.FORMAT``).
TRANSCRIPT_FORMATS = ("txt", "vtt", "srt", "tsv", "json")
#: Options of the ``transcribe`` command that shape its output files rather than the transcription.
WRITER_OPTIONS = ("highlight_words", "max_line_count", "max_line_width", "max_words_per_line")

_NEEDS_WORDS = "(needs --word-timestamps) "


@dataclass
class TranscribeOptions:
    """The ``whisper-rope transcribe`` command: upstream ``whisper``'s options (same names, defaults and meanings;
    booleans also as bare flags), the files to write, and whisper_rope's own (``batch_size``, ``unpadded``).
    The model is loaded with `whisper_rope.weights.loading.LoadOptions` (``--compute_type auto`` by default: int8
    on the CPU; ``--compute_type float32`` is upstream's numerics)."""

    audio: List[PathText] = opt([], "audio files to transcribe", positional=True, nargs="+")
    model: PathText = opt("turbo", MODEL_HELP)
    output_dir: PathText = opt(".", "directory for the output files", flags=["-o"])
    output_format: str = opt(
        "all",
        "output format; 'all' writes every format",
        flags=["-f"],
        choices=["txt", "vtt", "srt", "tsv", "json", "all"],
    )
    verbose: bool = opt(True, "print segments and progress as they are decoded")
    task: str = opt(
        "transcribe",
        "'transcribe' keeps the spoken language, 'translate' produces English",
        choices=["transcribe", "translate"],
    )
    language: Optional[str] = opt(
        None,
        "spoken language; detected when not given (English-only models always use English)",
        choices=sorted(LANGUAGES) + sorted(k.title() for k in TO_LANGUAGE_CODE),
    )
    temperature: float = opt(0.0, "sampling temperature of the first attempt", bounds=Bounds.reals(0, 5))
    best_of: Optional[int] = opt(
        5, "candidates sampled when the temperature is above zero", type=optional_int, bounds=BEAMS
    )
    beam_size: Optional[int] = opt(5, "beams for beam search at temperature zero", type=optional_int, bounds=BEAMS)
    patience: Optional[float] = opt(
        None,
        "beam-search patience factor (1.0 = conventional beam search)",
        bounds=Bounds.reals(0, 10, low_open=True),
    )
    length_penalty: Optional[float] = opt(
        None,
        "length-penalty exponent alpha for ranking beams; plain length normalisation when not given",
        bounds=Bounds.reals(0, 1),
    )
    suppress_tokens: str = opt(
        "-1", "comma-separated token ids never to emit; -1 means most special symbols except common punctuation"
    )
    initial_prompt: Optional[str] = opt(None, "text given to the model as the context of the first window")
    carry_initial_prompt: bool = opt(False, "give the initial prompt to every window")
    condition_on_previous_text: bool = opt(
        True, "give each window the previous window's text as context (consistent, but can get stuck in loops)"
    )
    fp16: bool = opt(True, "run in half precision (falls back to fp32 on the CPU)")
    temperature_increment_on_fallback: Optional[float] = opt(
        0.2,
        "temperature step of the retries when a window fails the thresholds below",
        type=optional_float,
        bounds=Bounds.reals(0.01, 1),
    )
    compression_ratio_threshold: Optional[float] = opt(
        2.4,
        "a window whose text gzip-compresses better than this ratio is retried",
        type=optional_float,
        bounds=Bounds.reals(0),
    )
    logprob_threshold: Optional[float] = opt(
        -1.0,
        "a window whose mean token log-probability is below this is retried",
        type=optional_float,
        bounds=Bounds.reals(None, 0),
    )
    no_speech_threshold: Optional[float] = opt(
        0.6,
        "a window is silence when P(no speech) is above this and the log-probability test failed",
        type=optional_float,
        bounds=Bounds.reals(0, 1),
    )
    word_timestamps: bool = opt(False, "compute word-level timestamps (cross-attention alignment)")
    prepend_punctuations: str = opt("\"'“¿([{-", "with word timestamps: punctuation joined to the next word")
    append_punctuations: str = opt(
        "\"'.。,，!！?？:：”)]}、", "with word timestamps: punctuation joined to the previous word"
    )
    highlight_words: bool = opt(False, _NEEDS_WORDS + "underline the spoken word in srt/vtt")
    max_line_width: Optional[int] = opt(
        None, _NEEDS_WORDS + "characters per subtitle line", type=optional_int, bounds=Bounds.integers(1)
    )
    max_line_count: Optional[int] = opt(
        None, _NEEDS_WORDS + "lines per subtitle segment", type=optional_int, bounds=Bounds.integers(1)
    )
    max_words_per_line: Optional[int] = opt(
        None,
        "(needs --word-timestamps; ignored with --max-line-width) words per subtitle segment",
        type=optional_int,
        bounds=Bounds.integers(1),
    )
    batch_size: int = opt(
        1,
        "decode up to this many files of at most 30 s together (same results as one by one), and cut longer "
        "files at pauses (voice-activity detection) into chunks of at most 25 s of speech decoded this many "
        "at a time, the chunks of several files together (faster; chunks are not conditioned on each other's "
        "text); 1: upstream's window-by-window loop",
        bounds=BATCH,
    )
    clip_timestamps: str = opt("0", "comma-separated start,end,... seconds of the spans to transcribe")
    hallucination_silence_threshold: Optional[float] = opt(
        None,
        _NEEDS_WORDS + "skip silences longer than this many seconds around suspected hallucinations",
        type=optional_float,
        bounds=Bounds.reals(0),
    )
    unpadded: Optional[bool] = opt(
        None,
        "encode only the real frames of each window (an encoder with a sinusoid table adds its rows 0..n-1: the "
        "sliced table); default: on for checkpoints fine-tuned unpadded, else off",
    )

    def temperatures(self) -> Tuple[float, ...]:
        """The first temperature and its fallbacks, as upstream's command builds them; a first temperature above 1
        has no fallbacks (upstream's command builds none and then fails)."""
        if self.temperature_increment_on_fallback is None:
            return (self.temperature,)
        return tuple(np.arange(self.temperature, 1.0 + 1e-6, self.temperature_increment_on_fallback)) or (
            self.temperature,
        )

    def transcribe_kwargs(self) -> Dict[str, Any]:
        """The keywords for upstream ``transcribe`` (and the `DecodingOptions` it passes on)."""
        ours = {"audio", "model", "output_dir", "output_format", "batch_size", "unpadded", "temperature"}
        ours |= {"temperature_increment_on_fallback", *WRITER_OPTIONS}
        kwargs = {k: v for k, v in vars(self).items() if k not in ours}
        return {**kwargs, "temperature": self.temperatures()}

    def validate(self) -> "TranscribeOptions":
        """Refuse, in one line naming the option (`OptionError`), before any model is loaded or any file written:
        a number outside its declared range, spans and token ids upstream's command cannot parse, a writer option
        without ``--word-timestamps``, and two inputs whose transcripts would have the same name. Warns of writer
        options that have no effect together. Returns itself."""
        check_bounds(self)
        _check_clip_timestamps(self.clip_timestamps, flags("clip_timestamps"))
        _check_suppress_tokens(self.suppress_tokens, flags("suppress_tokens"))
        self._check_writer_options()
        self._check_distinct_transcripts()
        return self

    def _check_writer_options(self) -> None:
        if not self.word_timestamps:
            for name in WRITER_OPTIONS:
                if getattr(self, name):
                    raise OptionError(f"--{name.replace('_', '-')} requires --word-timestamps")
        if self.max_line_count and not self.max_line_width:
            warnings.warn("--max-line-count has no effect without --max-line-width", stacklevel=3)
        if self.max_words_per_line and self.max_line_width:
            warnings.warn("--max-words-per-line has no effect with --max-line-width", stacklevel=3)

    def _check_distinct_transcripts(self) -> None:
        """Refuse two inputs whose transcripts would have the same name (``x/clip.flac``, ``y/clip.wav``): the
        second would replace the first's, written by the same run."""
        extension = "txt" if self.output_format == "all" else self.output_format
        first: Dict[str, int] = {}
        for index, path in enumerate(self.audio):
            stem = _stem(path)
            if first.setdefault(stem, index) != index:
                shown = os.path.join(self.output_dir, f"{stem}.{extension}")
                raise OptionError(
                    f"{self.audio[first[stem]]} and {path} would both be transcribed to {shown}; transcribe them "
                    "into separate --output_dir folders"
                )


def _check_clip_timestamps(text: str, flag: str) -> None:
    """Upstream's form: ``start,end,start,end,...`` seconds (a last start without an end runs to the end)."""
    try:
        times = [float(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise OptionError(f"{flag} must be comma-separated seconds (start,end,...), got {text!r}") from None
    if not all(math.isfinite(t) and t >= 0 for t in times):
        raise OptionError(f"{flag} must be finite, non-negative seconds, got {text!r}")
    for start, end in zip(times[::2], times[1::2]):
        if end <= start:
            raise OptionError(f"{flag}: each end must be after its start, got {start:g},{end:g}")


def _check_suppress_tokens(text: str, flag: str) -> None:
    try:
        [int(part) for part in text.split(",")]  # upstream's parse
    except ValueError:
        raise OptionError(f"{flag} must be comma-separated token ids (-1: the default set), got {text!r}") from None


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``whisper-rope transcribe``: `TranscribeOptions` fields, then `LoadOptions` fields in a group
    of their own."""
    add_dataclass_arguments(parser, TranscribeOptions)
    add_dataclass_arguments(parser.add_argument_group("loading the model (whisper_rope)"), LoadOptions)
    return parser


def run_transcribe_cli(args: argparse.Namespace) -> int:
    """Run ``whisper-rope transcribe`` from parsed arguments: load the model, transcribe in batches, write each
    input's transcripts; exit status 1 when any input failed (each reported in one line), else 0."""
    # Validated before the model is loaded, so that a bad number or output fails in one line, not after a minute of
    # loading.
    options = dataclass_from_args(TranscribeOptions, args, keep_none=True).validate()
    loading = dataclass_from_args(LoadOptions, args).validate()
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
