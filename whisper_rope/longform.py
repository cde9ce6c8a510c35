"""Batched long-form transcription: a recording cut into speech chunks of at most 25 s, decoded in batches.

Upstream's ``transcribe`` walks a long recording window by window, each window starting where the previous one's
last complete segment ended and conditioned on its text: strictly one window at a time. Here the recording is cut
at pauses first (`speech_chunks`, a voice-activity detector), the chunks are decoded ``batch_size`` at a time with
`WhisperRope.decode` (an unpadded model encodes each chunk at its own length), and each chunk's timestamp tokens
become segments whose times are mapped back to the recording. Several recordings (`transcribe_recordings`) share
batches: a few short recordings fill them as one long one does. What differs from upstream, by design:

* chunks are independent: no chunk is conditioned on the previous chunk's text (``condition_on_previous_text`` is
  ignored; an ``initial_prompt`` is given to every chunk); silence between speech spans is not decoded;
* temperature fallback is upstream's rule (compression ratio, mean log-probability, no-speech probability) applied
  per chunk, the chunks that fail one temperature re-decoded together at the next;
* a chunk whose decoding stops inside a segment (token cap) closes that segment at the chunk's end;
* a chunk whose text ends (end of text after a timestamp) well before its audio does is decoded again from its last
  timestamp, the way upstream resumes its next window there (`MIN_TAIL_SECONDS`, `MAX_TAIL_PASSES`); the tails of
  a recording's chunks are packed into chunks of their own, and those of all recordings share batches, so a pass
  of tails costs a few windows.

Word timestamps use upstream's alignment (`whisper.timing.add_word_timestamps`) on each chunk's own frames.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from whisper.audio import HOP_LENGTH
from whisper.decoding import DecodingResult
from whisper.timing import add_word_timestamps
from whisper.tokenizer import Tokenizer, get_tokenizer
from whisper.utils import format_timestamp

from .features import first_transcription_window, language_window
from .model import WhisperRope
from .speech_chunks import SpeechChunk, pack_chunks, speech_chunks
from .transcribe_options import transcribe_dtype, window_decoding_options

__all__ = ["split_at_timestamps", "supports", "transcribe_chunked", "transcribe_recordings"]

SECONDS_PER_TIMESTAMP = 0.02

# A chunk whose text ends this long before its audio does is decoded again from there (`_untranscribed_tail`),
# at most this many times: tiny.en sometimes ends its text a sentence or two before the chunk ends (beam search more
# often than greedy), and each further pass decodes a strictly shorter tail.
MIN_TAIL_SECONDS = 1.5
MAX_TAIL_PASSES = 2

# Upstream ``transcribe`` options this path cannot honour; a recording asking for one is transcribed by upstream.
SEQUENTIAL_ONLY = ("clip_timestamps", "hallucination_silence_threshold")


def whole_audio(options: Dict[str, Any]) -> bool:
    """Whether these ``transcribe`` options ask for the whole audio (``clip_timestamps`` at upstream's default,
    in any of the spellings upstream accepts for it) rather than some spans of it."""
    return options.get("clip_timestamps", "0") in ("0", [0], [0.0], (0,), (0.0,))


def supports(options: Dict[str, Any]) -> bool:
    """Whether `transcribe_chunked` honours these ``transcribe`` options (else upstream's loop must run)."""
    return whole_audio(options) and options.get("hallucination_silence_threshold") is None


def transcribe_chunked(model: WhisperRope, audio: np.ndarray, batch_size: int = 8, **options: Any) -> dict:
    """Transcribe a recording of any length as speech chunks decoded in batches.

    Args:
        model: any `WhisperRope` variant and compute type.
        audio: (n_samples,) 16-kHz float waveform.
        batch_size: chunks per ``model.decode`` call.
        options: upstream ``transcribe``'s keywords (see the module docstring for the ones that behave
            differently) and `DecodingOptions`' keywords.

    Returns upstream's result dict: ``text``, ``segments`` (``id``, ``seek``, ``start``, ``end`` in seconds of the
    recording, ``text``, ``tokens``, ``temperature``, ``avg_logprob``, ``compression_ratio``, ``no_speech_prob``,
    and ``words`` with word timestamps) and ``language``.
    """
    return transcribe_recordings(model, [audio], batch_size, **options)[0]


def transcribe_recordings(
    model: WhisperRope, recordings: Sequence[np.ndarray], batch_size: int = 8, **options: Any
) -> List[dict]:
    """`transcribe_chunked` of several recordings at once: the speech chunks of all of them (of one language)
    share batches, and so do their tails, so that a few short recordings fill batches as one long one does.

    Returns one result dict per recording, in order; each is what `transcribe_chunked` gives that recording alone,
    up to the floating-point rounding of a different batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of chunks, got {batch_size}")
    if not supports(options):
        raise ValueError(f"batched long-form transcription does not support {', '.join(SEQUENTIAL_ONLY)}")
    states, pieces = [], []
    for audio in recordings:
        state = _recording(model, np.asarray(audio, dtype=np.float32).reshape(-1), options)
        states.append(state)
        pieces += [_Piece(state, chunk) for chunk in state.chunks]
    for _ in range(1 + MAX_TAIL_PASSES):
        tails = _decode_pass(model, pieces, batch_size, options)
        if not tails:
            break
        # The tails of a recording are packed together like speech spans: a few windows, not one per tail.
        pieces = [
            _Piece(state, chunk)
            for state in states
            for chunk in pack_chunks(
                sorted(span for tail in tails if tail.recording is state for span in tail.chunk.spans)
            )
        ]
    return [_result(state, options) for state in states]


@dataclass
class _Recording:
    """A recording being transcribed: its audio, speech chunks, language, and the segments decoded so far."""

    audio: np.ndarray  # (n_samples,) float32, 16 kHz
    chunks: List[SpeechChunk]
    language: str
    tokenizer: Tokenizer
    segments: List[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Piece:
    """A chunk of one recording, waiting for its decode."""

    recording: _Recording
    chunk: SpeechChunk


def _recording(model: WhisperRope, audio: np.ndarray, options: Dict[str, Any]) -> _Recording:
    chunks = speech_chunks(audio)
    language = _language(model, audio, chunks, options)
    tokenizer = get_tokenizer(
        model.is_multilingual,
        num_languages=model.num_languages,
        language=language,
        task=options.get("task", "transcribe"),
    )
    return _Recording(audio, chunks, language, tokenizer)


def _result(recording: _Recording, options: Dict[str, Any]) -> dict:
    """Upstream's result dict of a decoded recording: its segments in time order, numbered."""
    flat = sorted(recording.segments, key=lambda segment: segment["start"])  # chunks never overlap in time
    for number, segment in enumerate(flat):
        segment["id"] = number
        if options.get("verbose"):
            print(f"[{format_timestamp(segment['start'])} --> {format_timestamp(segment['end'])}] {segment['text']}")
    return {"text": "".join(segment["text"] for segment in flat), "segments": flat, "language": recording.language}


def _decode_pass(model: WhisperRope, pieces: List[_Piece], batch_size: int, options: Dict[str, Any]) -> List[_Piece]:
    """Decode ``pieces`` in batches of one language, longest first, add their segments to their recordings, and
    return the untranscribed tails (`_untranscribed_tail`) to decode next.

    Chunks of similar length share a batch, so an unpadded batch pads little and its rows finish together. Longest
    first because a batch decodes until its longest transcript ends: the partial last batch then holds the shortest
    chunks instead of the longest (the 325-s benchmark set at beam 5: 202 instead of 213 decoding steps, 2 % less
    CPU time in int8, the same transcripts)."""
    tails = []
    for language in dict.fromkeys(piece.recording.language for piece in pieces):
        ordered = sorted(
            (p for p in pieces if p.recording.language == language), key=lambda p: p.chunk.n_samples, reverse=True
        )
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            # Windows are built per batch: the mels of a whole pass of long recordings would be large.
            windows = [first_transcription_window(p.chunk.audio(p.recording.audio), model.dims.n_mels) for p in batch]
            mels = torch.stack([mel for mel, _ in windows])
            for piece, window, result in zip(batch, windows, _decode_with_fallback(model, mels, language, options)):
                if _is_silence(result, options):
                    continue
                recording = piece.recording
                recording.segments += _chunk_segments(model, recording.tokenizer, piece.chunk, window, result, options)
                tail = _untranscribed_tail(piece.chunk, result, recording.tokenizer)
                if tail is not None:
                    tails.append(_Piece(recording, tail))
    return tails


def _untranscribed_tail(chunk: SpeechChunk, result: DecodingResult, tokenizer: Tokenizer) -> Optional[SpeechChunk]:
    """The audio after the chunk's last closed segment when the decoder ended the text (end of text after a
    timestamp) at least `MIN_TAIL_SECONDS` before the chunk's end, else None.

    Upstream's sequential loop resumes the next window at such a timestamp; a chunk has no next window, so its tail
    becomes a chunk of its own. A decoding that stopped inside a segment (token cap) or without timestamps leaves no
    tail: that segment already closes at the chunk's end.
    """
    tokens = result.tokens
    if not tokens or tokens[-1] < tokenizer.timestamp_begin:
        return None
    end = (tokens[-1] - tokenizer.timestamp_begin) * SECONDS_PER_TIMESTAMP
    if end <= 0 or chunk.duration - end < MIN_TAIL_SECONDS:
        return None
    return chunk.after(end)


def _language(model: WhisperRope, audio: np.ndarray, chunks: Sequence[SpeechChunk], options: Dict[str, Any]) -> str:
    """The given language, English for English-only models, else detected from the first chunk (upstream detects
    from the first 30 s)."""
    if options.get("language") is not None or not model.is_multilingual:
        return options.get("language") or "en"
    first = chunks[0].audio(audio) if chunks else audio
    mel = (
        language_window(first, model.dims.n_mels)
        .to(model.device)
        .to(transcribe_dtype(model, options.get("fp16", True)))
    )
    _, probs = model.detect_language(mel)
    return max(probs, key=probs.get)


def _temperatures(options: Dict[str, Any]) -> Sequence[float]:
    temperature = options.get("temperature", (0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    return (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)


def _decode_with_fallback(
    model: WhisperRope, mels: torch.Tensor, language: str, options: Dict[str, Any]
) -> List[DecodingResult]:
    """One result per chunk of ``mels`` (b, n_mels, 3000): decoded at the first temperature, and the chunks that
    fail upstream's thresholds again at each next temperature, together."""
    mels = mels.to(model.device).to(transcribe_dtype(model, options.get("fp16", True)))
    results: List[Optional[DecodingResult]] = [None] * mels.shape[0]
    pending = list(range(mels.shape[0]))
    for temperature in _temperatures(options):
        decoding_options = window_decoding_options(model, language, {**options, "temperature": temperature})
        for i, result in zip(pending, model.decode(mels[pending], decoding_options)):
            results[i] = result
        pending = [i for i in pending if _needs_fallback(results[i], options)]
        if not pending:
            break
    return results


def _needs_fallback(result: DecodingResult, options: Dict[str, Any]) -> bool:
    """Upstream's rule: too repetitive or too unlikely, unless the window is judged silent."""
    compression = options.get("compression_ratio_threshold", 2.4)
    logprob = options.get("logprob_threshold", -1.0)
    no_speech = options.get("no_speech_threshold", 0.6)
    failed = (compression is not None and result.compression_ratio > compression) or (
        logprob is not None and result.avg_logprob < logprob
    )
    return failed and not (no_speech is not None and result.no_speech_prob > no_speech)


def _is_silence(result: DecodingResult, options: Dict[str, Any]) -> bool:
    """Upstream skips a window whose no-speech probability is high unless its text is likely enough."""
    no_speech = options.get("no_speech_threshold", 0.6)
    logprob = options.get("logprob_threshold", -1.0)
    if no_speech is None or result.no_speech_prob <= no_speech:
        return False
    return logprob is None or result.avg_logprob <= logprob


def _chunk_segments(
    model: WhisperRope,
    tokenizer: Tokenizer,
    chunk: SpeechChunk,
    window: tuple,
    result: DecodingResult,
    options: Dict[str, Any],
) -> List[dict]:
    """The chunk's segments, times in seconds of the recording."""
    segments = [
        {
            "seek": 0,
            "start": start,
            "end": end,
            "text": tokenizer.decode([t for t in tokens if t < tokenizer.eot]),
            "tokens": tokens,
            "temperature": result.temperature,
            "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio,
            "no_speech_prob": result.no_speech_prob,
        }
        for start, end, tokens in split_at_timestamps(result.tokens, tokenizer, chunk.duration)
    ]
    if options.get("word_timestamps") and segments:
        mel, n_frames = window
        add_word_timestamps(
            segments=segments,
            model=model,
            tokenizer=tokenizer,
            mel=mel.to(model.device),
            num_frames=n_frames,
            prepend_punctuations=options.get("prepend_punctuations", "\"'“¿([{-"),
            append_punctuations=options.get("append_punctuations", "\"'.。,，!！?？:：”)]}、"),
            last_speech_timestamp=0.0,
        )
    seek = chunk.spans[0][0] // HOP_LENGTH
    for segment in segments:
        segment["seek"] = seek
        segment["start"] = chunk.recording_time(segment["start"])
        segment["end"] = chunk.recording_time(segment["end"], is_end=True)
        for word in segment.get("words", []):
            word["start"] = chunk.recording_time(word["start"])
            word["end"] = chunk.recording_time(word["end"], is_end=True)
    return [segment for segment in segments if segment["text"].strip() or segment.get("words")]


def split_at_timestamps(tokens: Sequence[int], tokenizer: Tokenizer, duration: float) -> List[tuple]:
    """(start s, end s, tokens) per segment of one decoded chunk of ``duration`` seconds.

    A segment is the text between two timestamp tokens (its start and end). A segment whose start is missing begins
    where the previous one ended (or at 0), one whose end is missing (decoding stopped inside it) ends at the chunk's
    end; without any timestamp the whole chunk is one segment. Times are clamped to ``duration``.
    """
    first_timestamp = tokenizer.timestamp_begin

    def seconds(token: int) -> float:
        return min((token - first_timestamp) * SECONDS_PER_TIMESTAMP, duration)

    segments, text, start, stamps = [], [], None, []
    previous_end = 0.0
    for token in tokens:
        if token < first_timestamp:
            text.append(token)
            continue
        if text:  # a timestamp after text closes the segment
            begin = previous_end if start is None else start
            segments.append((begin, max(seconds(token), begin), stamps + text + [token]))
            previous_end, text, start, stamps = segments[-1][1], [], None, []
        else:  # a timestamp before any text opens one (the last of several in a row wins)
            start, stamps = seconds(token), [token]
    if text:
        begin = previous_end if start is None else start
        segments.append((begin, max(duration, begin), stamps + text))
    return segments
