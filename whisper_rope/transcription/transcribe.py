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
from whisper.transcribe import transcribe as upstream_transcribe
from whisper.utils import format_timestamp, make_safe

from ..adapted_lengths import warn_outside
from ..audio import load_audio
from ..features import first_transcription_window, language_window
from ..model import WhisperRope
from .longform import supports, transcribe_recordings, whole_audio
from .window_options import transcribe_dtype, window_decoding_options

__all__ = ["transcribe_many"]

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
