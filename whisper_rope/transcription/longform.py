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
  of tails costs a few windows. Tails packed side by side are far apart in the recording: a segment the decoder
  runs across the seam of two is split there by its words' alignment (`split_at_breaks`), so that each piece is
  timed inside the tail it was spoken in.

Word timestamps use upstream's alignment (`whisper.timing.add_word_timestamps`) on each chunk's own frames.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from whisper.audio import HOP_LENGTH, SAMPLE_RATE
from whisper.decoding import DecodingResult
from whisper.timing import WordTiming, add_word_timestamps, find_alignment
from whisper.tokenizer import Tokenizer, get_tokenizer
from whisper.utils import format_timestamp

from ..features import first_transcription_window, language_window
from ..model import WhisperRope
from .speech_chunks import SPEECH_PAD_S, SpeechChunk, pack_tails, speech_chunks
from .window_options import transcribe_dtype, window_decoding_options

__all__ = ["split_at_breaks", "split_at_timestamps", "supports", "transcribe_chunked", "transcribe_recordings"]

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
        # The tails of a recording are packed together like speech spans: a few windows, not one per tail (a
        # window costs a whole encoder pass, however little audio it holds, unless the encoder is unpadded). The
        # breaks between them keep each segment inside one tail (`split_at_breaks`).
        pieces = [
            _Piece(state, chunk)
            for state in states
            for chunk in pack_tails([tail.chunk for tail in tails if tail.recording is state])
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
    chunks instead of the longest, which saves decoding steps and leaves the transcripts alone."""
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
    """The chunk's segments, times in seconds of the recording, each segment and its words inside one part of the
    chunk (`SpeechChunk.parts`)."""
    mel, n_frames = window
    parts = chunk.parts()
    pieces = split_at_timestamps(result.tokens, tokenizer, chunk.duration)
    if len(parts) > 1:
        text = [token for _, _, tokens in pieces for token in tokens if token < tokenizer.eot]
        pieces = split_at_breaks(pieces, tokenizer, parts, lambda: _alignment(model, tokenizer, text, result, window))
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
        for start, end, tokens in pieces
    ]
    # Each piece lies inside one part; word alignment may move its start or end (or a word) beyond that part.
    segment_parts = [parts[_part_index(parts, (start + end) / 2)] for start, end, _ in pieces]
    if options.get("word_timestamps") and segments:
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
    for segment, part in zip(segments, segment_parts):
        segment["seek"] = seek
        segment["start"] = _recording_time(chunk, part, segment["start"])
        segment["end"] = _recording_time(chunk, part, segment["end"], is_end=True)
        for word in segment.get("words", []):
            word["start"] = _recording_time(chunk, part, word["start"])
            word["end"] = _recording_time(chunk, part, word["end"], is_end=True)
    return [segment for segment in segments if segment["text"].strip() or segment.get("words")]


def _alignment(
    model: WhisperRope, tokenizer: Tokenizer, text: List[int], result: DecodingResult, window: tuple
) -> List[WordTiming]:
    """Upstream's `find_alignment` of a decoded chunk's ``text`` tokens, on the encoder output its decode made
    (``result.audio_features``, the whole window's) instead of a second encoder pass. An unpadded encoder's output
    in a batch holds the batch's padding, which its decode masked: that model encodes the window again."""
    mel, n_frames = window
    features = result.audio_features
    aligner = model if features is None or model.unpadded else _Encoded(model, features)
    return find_alignment(aligner, tokenizer, text, mel.to(model.device), n_frames)


class _Encoded:
    """A model whose audio is already encoded, as `find_alignment` calls it: ``aligner(mel, tokens)`` runs the
    decoder on ``features`` (n_audio_ctx, n_audio_state), and every attribute is the model's."""

    def __init__(self, model: WhisperRope, features: torch.Tensor):
        self.model, self.features = model, features

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(tokens, self.features.expand(tokens.shape[0], *self.features.shape))


def _part_index(parts: Sequence[Tuple[float, float]], seconds: float, is_end: bool = False) -> int:
    """Which of the chunk's ``parts`` (start s, end s) holds a time of the chunk: a time on the seam of two parts
    is in the second as a start and in the first as an end (``is_end``), one beyond the chunk in the last."""
    for index, (_, end) in enumerate(parts):
        if seconds < end or (is_end and seconds <= end):
            return index
    return len(parts) - 1


def _recording_time(chunk: SpeechChunk, part: Tuple[float, float], seconds: float, is_end: bool = False) -> float:
    """A time of the chunk, clamped into ``part`` (start s, end s), as seconds of the recording. A time on either
    end of the part stays in the part, start or end (`SpeechChunk.recording_time` puts an end on the part's start
    at the end of the part before, and a start on its end at the start of the part after)."""
    position = min(max(round(seconds * SAMPLE_RATE), round(part[0] * SAMPLE_RATE)), round(part[1] * SAMPLE_RATE))
    if position == round(part[0] * SAMPLE_RATE) or position == round(part[1] * SAMPLE_RATE):
        is_end = position == round(part[1] * SAMPLE_RATE)
    return chunk.recording_time(position / SAMPLE_RATE, is_end=is_end)


def split_at_breaks(
    segments: Sequence[tuple],
    tokenizer: Tokenizer,
    parts: Sequence[Tuple[float, float]],
    align: Callable[[], Sequence[WordTiming]],
) -> List[tuple]:
    """Segments (start s, end s, tokens) of a chunk cut at the seams of its ``parts`` (start s, end s): a chunk of
    packed tails holds pieces of the recording far apart, and a segment timed across a seam would span the speech
    between them.

    A segment that starts in the last `SPEECH_PAD_S` of a part (the silence the voice-activity detector keeps after
    speech) starts at the next part: none of the first part's speech is in it. A segment that still crosses seams
    is cut into one segment per part that holds its words, each word in the part that holds its middle; a piece
    starts and ends where the segment does or at a seam, where it gets a timestamp token. ``align()`` (called once,
    and only for such a segment) gives the words: `whisper.timing.find_alignment` of the text tokens of all
    ``segments``, in order. Without words the segment stays whole in the part that holds most of it.
    """
    text_counts = [sum(token < tokenizer.eot for token in tokens) for _, _, tokens in segments]
    offsets = np.cumsum([0, *text_counts])  # text tokens before each segment
    middles: Optional[List[float]] = None  # the middle of each text token's word (s)
    split = []
    for (start, end, tokens), offset, count in zip(segments, offsets, text_counts):
        first, last = _part_index(parts, start), _part_index(parts, end, is_end=True)
        while first < last and start >= parts[first][1] - SPEECH_PAD_S:
            first += 1
            start = parts[first][0]
        if first == last:
            split.append((start, end, tokens))
            continue
        if middles is None:
            middles = [(word.start + word.end) / 2 for word in align() for _ in word.tokens]
        words = middles[offset : offset + count] if offset + count <= len(middles) else None
        split += _split_segment(start, end, tokens, tokenizer, parts[first : last + 1], words)
    return split


def _split_segment(
    start: float,
    end: float,
    tokens: Sequence[int],
    tokenizer: Tokenizer,
    parts: Sequence[Tuple[float, float]],
    words: Optional[Sequence[float]],
) -> List[tuple]:
    """`split_at_breaks` of one segment that crosses the seams of ``parts`` (those it touches); ``words``: the
    middle of the word of each of its text tokens, or None."""
    lead = _leading_timestamps(tokens, tokenizer)
    trail = _leading_timestamps(tokens[::-1], tokenizer)
    body = tokens[lead : len(tokens) - trail]
    if words is None:
        shares = [min(end, part_end) - max(start, part_start) for part_start, part_end in parts]
        token_parts = [shares.index(max(shares))] * len(body)
    else:
        token_parts, part, middles = [], 0, iter(words)
        for token in body:
            if token < tokenizer.eot:  # a text token: the part of its word's middle, never an earlier one
                part = max(part, _part_index(parts, next(middles)))
            token_parts.append(part)
    runs = [index for index in range(len(body)) if index == 0 or token_parts[index] != token_parts[index - 1]]
    pieces = []
    for number, run_start in enumerate(runs):
        run_end = runs[number + 1] if number + 1 < len(runs) else len(body)
        part_start, part_end = parts[token_parts[run_start]]
        piece_start, piece_end = max(start, part_start), min(end, part_end)
        opening = tokens[:lead] if number == 0 else [_timestamp(piece_start, tokenizer)]
        closing = tokens[len(tokens) - trail :] if run_end == len(body) else [_timestamp(piece_end, tokenizer)]
        pieces.append((piece_start, piece_end, [*opening, *body[run_start:run_end], *closing]))
    return pieces


def _leading_timestamps(tokens: Sequence[int], tokenizer: Tokenizer) -> int:
    """How many timestamp tokens ``tokens`` begins with."""
    count = 0
    while count < len(tokens) and tokens[count] >= tokenizer.timestamp_begin:
        count += 1
    return count


def _timestamp(seconds: float, tokenizer: Tokenizer) -> int:
    """The timestamp token nearest to a time of the chunk."""
    return tokenizer.timestamp_begin + round(seconds / SECONDS_PER_TIMESTAMP)


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
