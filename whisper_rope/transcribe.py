"""Transcribe many short files together: one `decode` call per batch of clips instead of one per clip.

For a clip of at most 30 s, upstream's `transcribe` starts with one `decode` of a single window at the first
temperature. `transcribe_many` computes those first decodes for a whole batch in one ``model.decode`` call, then runs
upstream's `transcribe` on each clip with that call's result handed in: everything after it (temperature fallback,
further windows, word timestamps, segments, the result dict) is upstream's own code, so a clip's result is what
`transcribe` alone returns. A clip whose batched result fails the thresholds is re-decoded by `transcribe` itself at
the next temperature, alone, as upstream does it; so are any later windows. Longer clips go through `transcribe`
unchanged.

Batches are formed from clips sorted by length (within a read-ahead of a few batches, so that memory stays bounded
however many files there are), so that an unpadded encoder (``model.unpadded``) encodes little padding;
`WhisperRope.decode` encodes each clip of such a batch as if alone and masks the rest.

Results agree with one-by-one `transcribe` to floating-point rounding: texts, tokens and timestamps are the same
(on the committed fixtures), log-probabilities agree to about 1e-6 (a batched matrix product sums in another order).
"""

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.tokenizer import get_tokenizer
from whisper.transcribe import transcribe as upstream_transcribe

from .audio import load_audio
from .features import first_transcription_window, language_window
from .model import WhisperRope

__all__ = ["transcribe_many"]

AudioInput = Union[str, "os.PathLike[str]", np.ndarray, Tensor]

# Clips read ahead and sorted by length before they are cut into batches: an unpadded encoder then encodes little
# padding, while only this many batches of audio are held in memory at once.
_SORTED_BATCHES = 4

# Options of upstream `transcribe` itself; every other keyword goes to `DecodingOptions`, as upstream does it.
_TRANSCRIBE_OPTIONS = frozenset(
    name for name, p in inspect.signature(upstream_transcribe).parameters.items() if p.kind is p.KEYWORD_ONLY
)


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
    **transcribe_options: Any,
) -> List[dict]:
    """Transcribe several clips, decoding the clips of at most 30 s in batches.

    Args:
        model: a `WhisperRope` (any variant; an unpadded one batches clips of different lengths too).
        audio: file paths, or 16 kHz mono float waveforms (numpy arrays or tensors).
        batch_size: clips per ``model.decode`` call.
        transcribe_options: every keyword of upstream's `transcribe` (``temperature``, ``word_timestamps``,
            ``initial_prompt``, ``verbose``, ...) and of `DecodingOptions` (``language``, ``beam_size``, ``fp16``, ...),
            with upstream's defaults and meanings.

    Returns one upstream result dict per input, in input order: ``text``, ``segments`` (each with ``id``, ``seek``,
    ``start``, ``end``, ``text``, ``tokens``, ``temperature``, ``avg_logprob``, ``compression_ratio``,
    ``no_speech_prob``, and ``words`` with word timestamps) and ``language``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of clips, got {batch_size}")
    results: List[Optional[dict]] = [None] * len(audio)
    batchable = transcribe_options.get("clip_timestamps", "0") in ("0", [0], [0.0], (0,), (0.0,))
    chunk = batch_size * _SORTED_BATCHES
    for start in range(0, len(audio), chunk):
        clips: List[_Clip] = []
        for index in range(start, min(start + chunk, len(audio))):
            item = audio[index]
            waveform = load_audio(item) if isinstance(item, (str, os.PathLike)) else item
            clip = _first_window(model, index, waveform) if batchable else None
            if clip is None:
                results[index] = upstream_transcribe(model, waveform, **transcribe_options)
            else:
                clips.append(clip)
        _transcribe_clips(model, clips, batch_size, transcribe_options, results)
    return results


def _transcribe_clips(
    model: WhisperRope, clips: List[_Clip], batch_size: int, options: Dict[str, Any], results: List[Optional[dict]]
) -> None:
    """Batched first decodes of ``clips`` (sorted by length), then upstream `transcribe` of each, into ``results``."""
    clips = sorted(clips, key=lambda clip: clip.n_frames)
    dtype = _dtype(model, options.get("fp16", True))
    for language, group in _by_language(model, clips, options):
        decoding_options = _first_decoding_options(model, language, options)
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            windows = torch.stack([clip.window for clip in batch]).to(model.device).to(dtype)
            for clip, first in zip(batch, model.decode(windows, decoding_options)):
                with _first_decode_given(model, clip.window, decoding_options, first):
                    results[clip.index] = upstream_transcribe(model, clip.audio, **{**options, "language": language})


def _dtype(model: WhisperRope, fp16: bool) -> torch.dtype:
    """Upstream `transcribe`'s choice: fp16 unless asked otherwise, never on the CPU."""
    return torch.float16 if fp16 and model.device != torch.device("cpu") else torch.float32


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
    dtype = _dtype(model, options.get("fp16", True))
    for clip in clips:
        # Upstream detects from the first 30 s of the silence-padded spectrogram, not from the zero-padded window.
        _, probs = model.detect_language(language_window(clip.audio, model.dims.n_mels).to(model.device).to(dtype))
        clip.language = max(probs, key=probs.get)
    for language in dict.fromkeys(clip.language for clip in clips):
        yield language, [clip for clip in clips if clip.language == language]


def _first_decoding_options(model: WhisperRope, language: str, options: Dict[str, Any]) -> DecodingOptions:
    """The `DecodingOptions` of upstream `transcribe`'s first decode of a clip."""
    decode_options = {k: v for k, v in options.items() if k not in _TRANSCRIBE_OPTIONS}
    if _dtype(model, decode_options.get("fp16", True)) == torch.float32:
        decode_options["fp16"] = False
    decode_options["language"] = language
    prompt = options.get("initial_prompt")
    if prompt is None:
        decode_options["prompt"] = []
    else:
        tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=decode_options.get("task", "transcribe"),
        )
        decode_options["prompt"] = tokenizer.encode(" " + prompt.strip())
    temperature = options.get("temperature", (0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    first = temperature if isinstance(temperature, (int, float)) else temperature[0]
    if first > 0:
        decode_options.pop("beam_size", None)
        decode_options.pop("patience", None)
    else:
        decode_options.pop("best_of", None)
    return DecodingOptions(**decode_options, temperature=first)


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
