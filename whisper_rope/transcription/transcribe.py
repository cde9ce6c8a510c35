"""Transcribe many short files together: one `decode` call per batch of clips instead of one per clip.

For a clip of at most 30 s, upstream's `transcribe` starts with one `decode` of a single window at the first
temperature. `transcribe_many` computes those first decodes for a whole batch in one ``model.decode`` call, then runs
upstream's `transcribe` on each clip with that call's result handed in: everything after it (temperature fallback,
further windows, word timestamps, segments, the result dict) is upstream's own code, so a clip's result is what
`transcribe` alone returns. A clip whose batched result fails the thresholds is re-decoded by `transcribe` itself at
the next temperature, alone, as upstream does it; so are any later windows.

Recordings longer than 30 s are cut at pauses into speech chunks that are decoded in batches (`longform`), the
chunks of the long recordings among the inputs side by side (at most `_LONG_AUDIO_HELD` of audio held at once):
faster, but not upstream's window-by-window result (no chunk is conditioned on the previous one's text). Options
only upstream's loop honours (``clip_timestamps``, ``hallucination_silence_threshold``) send them through upstream's
`transcribe` instead.

Batches are formed from clips sorted by length (within a read-ahead of a few batches, so that memory stays bounded
however many files there are), so that an unpadded encoder (``model.unpadded``) encodes little padding;
`WhisperRope.decode` encodes each clip of such a batch as if alone and masks the rest.

Results agree with one-by-one `transcribe` to floating-point rounding: texts, tokens and timestamps are the same
(on the committed fixtures), log-probabilities agree to about 1e-6 (a batched matrix product sums in another order).
"""

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from whisper.transcribe import transcribe as upstream_transcribe
from whisper.utils import format_timestamp, make_safe, optional_float, optional_int

from ..adapted_lengths import warn_outside
from ..audio import load_audio
from ..features import first_transcription_window, language_window
from ..fields import Bounds, PathText, opt
from ..model import WhisperRope
from ..option_checks import BATCH, BEAMS
from ..weights.loading import MODEL_HELP
from .longform import supports, transcribe_recordings, whole_audio
from .window_options import transcribe_dtype, window_decoding_options

__all__ = ["TranscribeOptions", "transcribe_many"]

AudioInput = Union[str, "os.PathLike[str]", np.ndarray, Tensor]

# Clips read ahead and sorted by length before they are cut into batches: an unpadded encoder then encodes little
# padding, while only this many batches of audio are held in memory at once.
_SORTED_BATCHES = 4
# Samples of long recordings held at once to share batches of speech chunks (an hour, 230 MB as float32).
_LONG_AUDIO_HELD = 3600 * SAMPLE_RATE


@dataclass
class _Clip:
    """A clip of at most one window, waiting for its batched first decode."""

    index: int
    audio: Union[np.ndarray, Tensor]
    window: Tensor  # (n_mels, N_FRAMES), exactly as upstream `transcribe` builds its first window
    n_frames: int  # real mel frames (10 ms each)
    language: Optional[str] = None


def transcribe_many(
    model: WhisperRope,
    audio: Sequence[AudioInput],
    batch_size: int = 8,
    *,
    names: Optional[Sequence[str]] = None,
    **transcribe_options: Any,
) -> List[dict]:
    """Transcribe several clips, decoding the clips of at most 30 s in batches, and the speech chunks of longer
    recordings in batches too, several recordings' chunks side by side (`longform.transcribe_recordings`).

    Args:
        model: a `WhisperRope` (any variant; an unpadded one batches clips of different lengths too).
        audio: file paths, or 16 kHz mono float waveforms (numpy arrays or tensors).
        batch_size: clips per ``model.decode`` call.
        transcribe_options: every keyword of upstream's `transcribe` (``temperature``, ``word_timestamps``,
            ``initial_prompt``, ``verbose``, ...) and of `DecodingOptions` (``language``, ``beam_size``, ``fp16``, ...),
            with upstream's defaults and meanings. ``verbose=True`` prints each input's segments as upstream does,
            after a line naming the input, in input order once its read-ahead group of clips is decoded (batches
            finish in length order).
        names: what verbose output calls each input (default: its path, or ``audio N`` for a waveform).

    Returns one upstream result dict per input, in input order: ``text``, ``segments`` (each with ``id``, ``seek``,
    ``start``, ``end``, ``text``, ``tokens``, ``temperature``, ``avg_logprob``, ``compression_ratio``,
    ``no_speech_prob``, and ``words`` with word timestamps) and ``language``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of clips, got {batch_size}")
    results: List[Optional[dict]] = [None] * len(audio)
    batchable = whole_audio(transcribe_options)
    verbose = transcribe_options.get("verbose")
    transcribe_options = {**transcribe_options, "verbose": None}  # printed below, in input order
    chunk = batch_size * _SORTED_BATCHES
    for start in range(0, len(audio), chunk):
        clips: List[_Clip] = []
        recordings = _LongRecordings(model, batch_size, transcribe_options, results)
        for index in range(start, min(start + chunk, len(audio))):
            item = audio[index]
            waveform = load_audio(item) if isinstance(item, (str, os.PathLike)) else item
            warn_outside(model, len(waveform) / SAMPLE_RATE)
            clip = _first_window(model, index, waveform) if batchable else None
            if clip is not None:
                clips.append(clip)
            elif len(waveform) > N_SAMPLES and supports(transcribe_options):
                recordings.add(index, waveform)
            else:  # empty, or options only upstream's loop honours
                results[index] = upstream_transcribe(model, waveform, **transcribe_options)
        recordings.transcribe()
        _transcribe_clips(model, clips, batch_size, transcribe_options, results)
        for index in range(start, min(start + chunk, len(audio))) if verbose else ():
            _print_result(_name(audio, names, index), results[index])
    return results


def _name(audio: Sequence[AudioInput], names: Optional[Sequence[str]], index: int) -> str:
    if names is not None:
        return names[index]
    return os.fspath(audio[index]) if isinstance(audio[index], (str, os.PathLike)) else f"audio {index}"


def _print_result(name: str, result: dict) -> None:
    """Upstream's verbose lines of one result's segments, after a line naming its input."""
    print(make_safe(f"{name}:"))
    for segment in result["segments"]:
        start, end = format_timestamp(segment["start"]), format_timestamp(segment["end"])
        print(make_safe(f"[{start} --> {end}] {segment['text']}"))


@dataclass
class _LongRecordings:
    """Recordings longer than one window, held until `transcribe` decodes their speech chunks together
    (`longform.transcribe_recordings`): the chunks of several recordings fill batches that each alone would not.
    At most `_LONG_AUDIO_HELD` samples are held; more are transcribed first."""

    model: WhisperRope
    batch_size: int
    options: Dict[str, Any]
    results: List[Optional[dict]]
    held: List[Tuple[int, Union[np.ndarray, Tensor]]] = field(default_factory=list)

    def add(self, index: int, audio: Union[np.ndarray, Tensor]) -> None:
        if self.held and sum(len(a) for _, a in self.held) + len(audio) > _LONG_AUDIO_HELD:
            self.transcribe()
        self.held.append((index, audio))

    def transcribe(self) -> None:
        if not self.held:
            return
        audios = [audio for _, audio in self.held]  # transcribe_recordings makes each a float32 array
        for (index, _), result in zip(
            self.held, transcribe_recordings(self.model, audios, self.batch_size, **self.options)
        ):
            self.results[index] = result
        self.held = []


def _transcribe_clips(
    model: WhisperRope, clips: List[_Clip], batch_size: int, options: Dict[str, Any], results: List[Optional[dict]]
) -> None:
    """Batched first decodes of ``clips`` (sorted by length), then upstream `transcribe` of each, into ``results``."""
    clips = sorted(clips, key=lambda clip: clip.n_frames)
    dtype = transcribe_dtype(model, options.get("fp16", True))
    for language, group in _by_language(model, clips, options):
        decoding_options = window_decoding_options(model, language, options)
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            windows = torch.stack([clip.window for clip in batch]).to(model.device).to(dtype)
            for clip, first in zip(batch, model.decode(windows, decoding_options)):
                with _first_decode_given(model, clip.window, decoding_options, first):
                    results[clip.index] = upstream_transcribe(model, clip.audio, **{**options, "language": language})


def _first_window(model: WhisperRope, index: int, audio: Union[np.ndarray, Tensor]) -> Optional[_Clip]:
    """The clip's first window as upstream `transcribe` builds it (on the CPU, in fp32), or None when the clip is
    empty or longer than one window."""
    if not 0 < len(audio) // HOP_LENGTH <= N_FRAMES:  # the frame count upstream's padded spectrogram will have
        return None
    window, n_frames = first_transcription_window(audio, model.dims.n_mels)
    return _Clip(index, audio, window, n_frames)


def _by_language(model: WhisperRope, clips: List[_Clip], options: Dict[str, Any]) -> Iterator[tuple]:
    """(language, clips) groups; a multilingual model without ``language`` detects it per clip, as upstream."""
    language = options.get("language")
    if language is not None or not model.is_multilingual:
        yield language or "en", clips
        return
    dtype = transcribe_dtype(model, options.get("fp16", True))
    for clip in clips:
        # Upstream detects from the first 30 s of the silence-padded spectrogram, not from the zero-padded window.
        _, probs = model.detect_language(language_window(clip.audio, model.dims.n_mels).to(model.device).to(dtype))
        clip.language = max(probs, key=probs.get)
    for language in dict.fromkeys(clip.language for clip in clips):
        yield language, [clip for clip in clips if clip.language == language]


@contextlib.contextmanager
def _first_decode_given(model: WhisperRope, window: Tensor, options: DecodingOptions, result: DecodingResult):
    """Within the block, ``model.decode`` returns ``result`` for its first call if that call asks for exactly this
    window with these options; any other call (a fallback temperature, a later window) decodes as usual."""
    pending = [result]
    decode = model.decode

    def decode_or_reuse(mel: Tensor, call_options: DecodingOptions = DecodingOptions(), **kwargs):
        if pending and not kwargs and call_options == options and mel.shape == window.shape:
            given = pending.pop()
            if torch.equal(mel, window.to(mel.device).to(mel.dtype)):
                return given
        pending.clear()
        return decode(mel, call_options, **kwargs)

    model.decode = decode_or_reuse
    try:
        yield
    finally:
        del model.decode


#: Options of the ``transcribe`` command that shape its output files rather than the transcription.
WRITER_OPTIONS = ("highlight_words", "max_line_count", "max_line_width", "max_words_per_line")

_NEEDS_WORDS = "(needs --word-timestamps) "


@dataclass
class TranscribeOptions:
    """The ``whisper-rope transcribe`` command: upstream ``whisper``'s options (same names, defaults and meanings;
    booleans also as bare flags), the files to write, and whisper_rope's own (``batch_size``, ``unpadded``).
    The model is loaded with `whisper_rope.weights.loading.LoadOptions`."""

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
