"""Where the speech of a recording is, and how it is cut into chunks of at most 25 s that decode side by side.

The voice-activity detector is Silero VAD (the ``silero-vad`` package; its model ships inside the package, nothing is
downloaded), run through the package's "sequence" ONNX model: one ONNX Runtime call per 16 s of audio instead of one
per 32-ms frame, with the same per-frame probabilities, several times cheaper than the package's TorchScript model
driven frame by frame, which would cost a third of a batched tiny.en transcription (benchmarks/README.md,
"Voice-activity detection"). ``webrtcvad`` (a Gaussian-mixture model over band energies) is cheaper still, but it is
tuned by an aggressiveness level per recording and judges 10-30-ms frames in isolation; Silero is a trained network
with context, the detector faster-whisper's batched pipeline also uses, and needs no tuning here.

Chunks: speech spans (each padded by `SPEECH_PAD_S` of its surroundings) are concatenated, in order, until the next
span would make the chunk longer than `CHUNK_SECONDS` (25 s); the silence between spans beyond the padding is left
out, so a chunk holds up to 25 s of speech, decoded in a 30-s window. Why not 30: tiny.en often ends its output
before the last sentence of a window filled with speech to its very end, so longer chunks lose whole sentences at
their ends (benchmarks/README.md compares 30-, 28- and 25-s chunks). A chunk remembers its spans, so that a time
inside it maps back to the recording (`SpeechChunk.recording_time`), and, when it packs pieces of several chunks
(`pack_tails`), where one piece ends and the next begins (its parts). A span longer than 25 s (the detector cuts
speech at its longest pause before that, so only a 25-s stretch without any pause) is cut into 25-s pieces.

Shapes and units: audio (n_samples,) float32 at 16 kHz; spans are (start, end) sample indices, end exclusive.
"""

import functools
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from whisper.audio import SAMPLE_RATE

Span = Tuple[int, int]

SPEECH_PAD_S = 0.2  # context kept on each side of a speech span (the pause a listener hears)
MIN_SILENCE_S = 0.16  # a pause at least this long separates two spans
MIN_SPEECH_S = 0.25  # shorter bursts are not speech
THRESHOLD = 0.5  # speech probability above which a frame is speech
CHUNK_SECONDS = 25.0  # speech per chunk at most (module docstring: why not the whole 30-s window)
CHUNK_SAMPLES = int(CHUNK_SECONDS * SAMPLE_RATE)


@functools.lru_cache(maxsize=1)
def _silero():
    """The package's sequence model and its timestamp function, loaded once. Importing ``silero_vad`` sets torch's
    thread count to 1 (a side effect of the package): the caller's setting is restored."""
    threads = torch.get_num_threads()
    try:
        import silero_vad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the package's own use of importlib.resources.path
            model = silero_vad.load_silero_vad(sequence=True)
    except ImportError as error:  # silero-vad and onnxruntime are dependencies: only a broken install gets here
        raise RuntimeError(f"batched long-form transcription needs silero-vad and onnxruntime: {error}") from error
    finally:
        torch.set_num_threads(threads)
    return model, silero_vad.get_speech_timestamps_sequence


def speech_spans(audio: np.ndarray) -> List[Span]:
    """Speech spans of a 16-kHz recording, in order, each padded by `SPEECH_PAD_S` (neighbours split the pause
    between them) and at most `CHUNK_SECONDS` long."""
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        return []
    model, timestamps = _silero()
    spans = timestamps(
        audio,
        model,
        threshold=THRESHOLD,
        sampling_rate=SAMPLE_RATE,
        min_speech_duration_ms=int(MIN_SPEECH_S * 1000),
        max_speech_duration_s=CHUNK_SECONDS - 2 * SPEECH_PAD_S,
        min_silence_duration_ms=int(MIN_SILENCE_S * 1000),
        speech_pad_ms=int(SPEECH_PAD_S * 1000),
    )
    return [piece for span in spans for piece in _at_most_one_chunk((int(span["start"]), int(span["end"])))]


def _at_most_one_chunk(span: Span) -> List[Span]:
    start, end = span
    return [(s, min(s + CHUNK_SAMPLES, end)) for s in range(start, end, CHUNK_SAMPLES)]


@dataclass(frozen=True)
class SpeechChunk:
    """Speech spans of one recording, concatenated in order into at most one 30-s window of audio.

    spans: (start, end) samples of the recording; the chunk's audio is their audio, one after the other.
    breaks: indices of the spans that do not continue the span before them: other speech of the recording, decoded
        in another chunk, lies between the two (`pack_tails`). Breaks cut the chunk into parts; a segment belongs
        to one part, since the recording between two parts is not this chunk's audio.
    """

    spans: Tuple[Span, ...]
    breaks: Tuple[int, ...] = ()

    @property
    def n_samples(self) -> int:
        return sum(end - start for start, end in self.spans)

    @property
    def duration(self) -> float:
        """Seconds of audio in the chunk."""
        return self.n_samples / SAMPLE_RATE

    def audio(self, recording: np.ndarray) -> np.ndarray:
        """(n_samples,) float32: the chunk's audio cut from ``recording``."""
        return np.concatenate([recording[start:end] for start, end in self.spans]).astype(np.float32, copy=False)

    def recording_time(self, seconds: float, is_end: bool = False) -> float:
        """A time inside the chunk (seconds from its start) as seconds of the recording.

        A time on the seam of two spans is the end of the first span for an end time (``is_end``) and the start of
        the second otherwise; times beyond the chunk are clamped to its last sample.
        """
        offset = 0
        position = round(seconds * SAMPLE_RATE)
        for index, (start, end) in enumerate(self.spans):
            length = end - start
            last = index == len(self.spans) - 1
            if position < offset + length or (is_end and position == offset + length) or last:
                return (start + min(max(position - offset, 0), length)) / SAMPLE_RATE
            offset += length
        raise AssertionError("unreachable: the last span returns")

    def parts(self) -> List[Tuple[float, float]]:
        """(start s, end s) inside the chunk of each part (the spans between two breaks), in order."""
        bounds, offset = [0.0], 0
        for index, (start, end) in enumerate(self.spans):
            if index in self.breaks:
                bounds.append(offset / SAMPLE_RATE)
            offset += end - start
        bounds.append(offset / SAMPLE_RATE)
        return list(zip(bounds, bounds[1:]))

    def after(self, seconds: float) -> Optional["SpeechChunk"]:
        """The chunk's audio from ``seconds`` (from its start) on, as a chunk of its own; None if nothing is left.
        The span holding that time is cut there; the spans after it are kept whole, and so are the breaks between
        them."""
        position = max(round(seconds * SAMPLE_RATE), 0)
        kept: List[Span] = []
        breaks: List[int] = []
        offset = 0
        for index, (start, end) in enumerate(self.spans):
            length = end - start
            if offset + length > position:
                if kept and index in self.breaks:
                    breaks.append(len(kept))
                kept.append((start + max(position - offset, 0), end))
            offset += length
        return SpeechChunk(tuple(kept), tuple(breaks)) if kept else None


def pack_chunks(spans: Sequence[Span], max_samples: int = CHUNK_SAMPLES) -> List[SpeechChunk]:
    """Consecutive spans (each at most ``max_samples`` long) concatenated greedily into chunks of at most
    ``max_samples`` samples, in recording order."""
    return _pack([tuple(spans)], max_samples)


def pack_tails(tails: Sequence[SpeechChunk], max_samples: int = CHUNK_SAMPLES) -> List[SpeechChunk]:
    """The untranscribed tails of one recording's chunks packed like speech spans (`pack_chunks`), in recording
    order, with a break (`SpeechChunk.breaks`) wherever two of them meet: the speech between two tails is decoded
    in their own chunks, so two tails side by side in a packed chunk are far apart in the recording."""
    parts = [part for tail in tails for part in _parts(tail)]
    return _pack(sorted(parts), max_samples)


def _parts(chunk: SpeechChunk) -> List[Tuple[Span, ...]]:
    """The chunk's spans, grouped into its parts."""
    cuts = [0, *chunk.breaks, len(chunk.spans)]
    return [chunk.spans[a:b] for a, b in zip(cuts, cuts[1:])]


def _pack(parts: Sequence[Sequence[Span]], max_samples: int) -> List[SpeechChunk]:
    """The spans of ``parts`` (each a run of consecutive spans, the runs in recording order) concatenated greedily
    into chunks of at most ``max_samples`` samples, a break where a run starts inside a chunk."""
    chunks: List[SpeechChunk] = []
    current: List[Span] = []
    breaks: List[int] = []
    length = 0
    for part in parts:
        for index, (start, end) in enumerate(part):
            if end - start > max_samples:
                raise ValueError(f"speech span {start}..{end} is longer than {max_samples} samples")
            if current and length + end - start > max_samples:
                chunks.append(SpeechChunk(tuple(current), tuple(breaks)))
                current, breaks, length = [], [], 0
            if current and index == 0:
                breaks.append(len(current))
            current.append((start, end))
            length += end - start
    if current:
        chunks.append(SpeechChunk(tuple(current), tuple(breaks)))
    return chunks


def speech_chunks(audio: np.ndarray) -> List[SpeechChunk]:
    """The recording's speech as chunks of at most `CHUNK_SECONDS` (`speech_spans`, then `pack_chunks`)."""
    return pack_chunks(speech_spans(audio))
