"""Decode audio files into the 16 kHz mono float32 waveform Whisper models consume, as upstream Whisper does.

Upstream ``whisper.audio.load_audio`` runs ``ffmpeg -i FILE -f s16le -ac 1 -acodec pcm_s16le -ar 16000 -`` and
divides the 16-bit samples by 32768; the models were trained on that decoding, so this module returns the same
samples:

* Files already at the target rate, mono, holding PCM or float samples in a container libsndfile reads (WAV, FLAC,
  AIFF, ...) are read in-process by ``soundfile`` and converted to 16 bits the way ffmpeg converts them (integers
  keep their top 16 bits, floats are rounded to the nearest step and clipped), with no subprocess: bit-equal to
  upstream.
* Everything else (other rates, several channels, lossy codecs, video containers) is decoded by ``ffmpeg`` with
  upstream's arguments, driven through ``ffmpeg-python``: the system binary if one is on ``PATH`` (upstream's), else
  the one bundled with ``imageio-ffmpeg``.

A ``start``/``end`` cut returns exactly the samples of the full decoding between those times (ffmpeg trims its
16 kHz output, after resampling, so the resampler's phase is that of the full decoding).  Float files with NaN or
infinite samples are the one place this module differs from upstream on purpose: it reads NaN as silence and
infinities as full scale, with a warning, where ffmpeg turns each into a full-scale click.

Every failure is raised as :class:`whisper_rope.errors.AudioError` with one sentence naming the file.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from typing import Iterator, Optional, Tuple

import ffmpeg  # ffmpeg-python: builds the command line and runs it
import numpy as np
import soundfile as sf

from whisper_rope.errors import AudioError, PathLike, one_line

__all__ = ["SAMPLE_RATE", "load_audio", "audio_duration", "ffmpeg_executable"]


#: Sample rate (Hz) every Whisper model expects.
SAMPLE_RATE: int = 16000

# Suffixes whose files libsndfile may read: containers of PCM or float samples, and Ogg, whose header gives
# `audio_duration` the stream's length without a subprocess.  MP3 is left out: libsndfile's libmpg123 prints its own
# warnings to the process's stderr, and ffmpeg decodes MP3 anyway.
_SOUNDFILE_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".aif", ".aiff", ".aifc", ".w64", ".rf64", ".caf", ".au", ".snd", ".ogg", ".oga"}
)

# libsndfile subtypes ffmpeg decodes to the same numbers, so converting them to 16 bits in-process as ffmpeg's
# libswresample does (integers cut to their top 16 bits, floats rounded and clipped) gives upstream's samples.
_INTEGER_SUBTYPES = frozenset({"PCM_16", "PCM_24", "PCM_32"})
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})

# Frames per soundfile read: ~16 s at 16 kHz, small next to an hour of audio yet large enough that per-block overhead
# is negligible.
_BLOCK_FRAMES = 1 << 18

# Output samples preallocated per byte of file at most (see `_honest_samples`): a header's frame count is a claim,
# and a FLAC header claiming 2**36 samples must not reserve 256 GiB.
_SAMPLES_PER_BYTE = 8

# How far a requested ``end`` may run past the last sample before it is an error rather than clamped: manifests round
# segment times (often to 10 ms), and a compressed file's reported length can differ from what decodes by up to one
# codec frame (1152 samples = 26 ms for MP3 at 44.1 kHz).
_END_TOLERANCE_S = 0.05


def ffmpeg_executable() -> str:
    """Return the path of the ffmpeg binary used for the files not read in-process.

    The system ``ffmpeg`` on ``PATH`` is preferred (the one upstream Whisper runs, usually with the most codecs);
    otherwise the static binary shipped inside the ``imageio-ffmpeg`` wheel is used, so a plain ``pip install``
    works on machines without ffmpeg.  Looked up on every call (cheap) so a changed ``PATH`` counts.

    Returns:
        Absolute path (or PATH-resolved path) of an ffmpeg executable.

    Raises:
        AudioError: neither a system ffmpeg nor imageio-ffmpeg's binary is available.
    """
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError) as exc:
        raise AudioError(
            "no ffmpeg executable was found: 'ffmpeg' is not on PATH and imageio-ffmpeg provides no binary "
            f"({one_line(exc, 200)}); install ffmpeg or `pip install imageio-ffmpeg`"
        ) from None


def load_audio(
    path: PathLike,
    sample_rate: int = SAMPLE_RATE,
    start: Optional[float] = None,
    end: Optional[float] = None,
) -> np.ndarray:
    """Decode an audio (or video) file to a mono float32 waveform, as upstream ``whisper.audio.load_audio`` does.

    Args:
        path: file to decode.  Mono PCM/float WAV, FLAC, ... already at ``sample_rate`` are read in-process;
            everything else is decoded by ffmpeg.
        sample_rate: output rate in Hz (Whisper uses 16000).
        start: first second to decode (``None``: from the beginning), e.g. a manifest segment's start.
        end: second to stop at, exclusive (``None``: to the end of the file).  Up to 50 ms past the end of the
            audio is clamped; further is an error.

    Returns:
        Array of shape ``(n_samples,)``, dtype float32, 16-bit values divided by 32768 (so in [-1, 1)), at
        ``sample_rate`` Hz.  Without a cut it equals upstream's ``load_audio`` sample for sample (same ffmpeg);
        with one it equals that array sliced at ``round(start * sample_rate)`` and ``round(end * sample_rate)``.
        Peak memory is about one copy of the result in-process and 1.5 (at most two) through ffmpeg (an hour at
        16 kHz is 230 MB); a cut through ffmpeg decodes (and discards) the file up to ``start``.

    Raises:
        AudioError: the file is missing, a directory, empty, undecodable, holds no samples, or ``start``/``end`` are
            negative, out of order, or beyond the audio.
    """
    name = os.fspath(path)
    _check_sample_rate(name, sample_rate)
    _check_file(name)
    _check_span(name, start, end)
    f = _open_soundfile(name)
    repaired = None
    if f is not None:
        with f:
            exact = f.subtype in _INTEGER_SUBTYPES | _FLOAT_SUBTYPES
            try:
                if exact and f.samplerate == sample_rate and f.channels == 1 and f.frames > 0:
                    return _read_in_process(name, f, start, end)
                if f.subtype in _FLOAT_SUBTYPES:
                    repaired = _repaired_floats(name, f)
            except (sf.SoundFileError, RuntimeError, OSError):
                pass  # a read error past the header: ffmpeg decodes the file, and reports what it cannot read
    return _decode_with_ffmpeg(name, sample_rate, start, end, repaired)


def audio_duration(path: PathLike) -> float:
    """Return the length of an audio file in seconds, decoding it only when nothing records the length.

    Uses libsndfile's header (exact frame count) for the formats it reads, else ffprobe's container duration when
    ``ffprobe`` is on PATH, else the length of ffmpeg's decoding.

    Args:
        path: audio or video file.

    Returns:
        Duration in seconds (float, > 0).

    Raises:
        AudioError: the file is missing, a directory, empty, or cannot be decoded.
    """
    name = os.fspath(path)
    _check_file(name)
    f = _open_soundfile(name)
    if f is not None:
        with f:
            if f.samplerate > 0 and f.frames > 0:
                return f.frames / f.samplerate
    duration = _ffprobe_duration(name)
    if duration:
        return duration
    # No ffprobe, or no duration in the container (e.g. raw ADTS streams): decoding is the only way to know.
    return load_audio(name).shape[0] / SAMPLE_RATE


# ----------------------------------------------------------------------------------------------------------------------
# argument and file checks


def _check_sample_rate(name: str, sample_rate: int) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(f"sample_rate for audio file '{name}' must be a positive integer in Hz, got {sample_rate!r}")


def _check_file(name: str) -> None:
    if not os.path.exists(name):
        raise AudioError(f"audio file '{name}' does not exist")
    if os.path.isdir(name):
        raise AudioError(f"audio file '{name}' is a directory, expected an audio file")
    try:
        size = os.path.getsize(name)
    except OSError as exc:
        raise AudioError(f"audio file '{name}' cannot be read ({exc.strerror})") from None
    if size == 0:
        raise AudioError(f"audio file '{name}' is empty (0 bytes), expected encoded audio")


def _check_span(name: str, start: Optional[float], end: Optional[float]) -> None:
    """Reject spans that are wrong whatever the file holds; spans beyond the audio are caught while decoding."""
    for label, value in (("start", start), ("end", end)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise AudioError(f"{label} for audio file '{name}' must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise AudioError(f"{label} {value:g} s for audio file '{name}' must not be negative")
    if start is not None and end is not None and end <= start:
        raise AudioError(f"end {end:g} s must be after start {start:g} s for audio file '{name}'")


def _span_samples(start: Optional[float], end: Optional[float], rate: int) -> Tuple[int, Optional[int]]:
    """``start``/``end`` seconds as output sample indices ``[first, last)`` (``last`` None: to the end); a span
    shorter than one sample still yields one."""
    first = 0 if start is None else int(round(start * rate))
    return first, None if end is None else max(first + 1, int(round(end * rate)))


def _past_the_end(name: str, label: str, seconds: float, length_s: Optional[float]) -> AudioError:
    said = "" if length_s is None else f", which is {length_s:.3f} s long"
    where = "at or past" if label == "start" else "past"
    return AudioError(f"{label} {seconds:g} s is {where} the end of audio file '{name}'{said}")


# ----------------------------------------------------------------------------------------------------------------------
# in-process reading (soundfile)


def _open_soundfile(name: str) -> Optional[sf.SoundFile]:
    """``name`` opened by libsndfile for reading, or None when its suffix is not one libsndfile is asked to read or
    libsndfile cannot read it (ffmpeg then decodes it, and reports its errors)."""
    if os.path.splitext(name)[1].lower() not in _SOUNDFILE_SUFFIXES:
        return None
    try:
        return sf.SoundFile(name)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError):
        return None


class _Output:
    """Growable float32 buffer that blocks are copied into, so the result exists once rather than as a list of
    chunks plus their concatenation."""

    def __init__(self, expected: int) -> None:
        self.buffer = np.empty(max(expected, 1), dtype=np.float32)
        self.size = 0

    def append(self, chunk: np.ndarray) -> None:
        end = self.size + chunk.shape[0]
        if end > self.buffer.shape[0]:
            # Only when a file holds more than its size suggested; grow by 25% to keep appends amortized O(1).
            grown = np.empty(max(end, self.buffer.shape[0] * 5 // 4), dtype=np.float32)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : end] = chunk
        self.size = end

    def result(self) -> np.ndarray:
        return self.buffer[: self.size]


def _read_in_process(name: str, f: sf.SoundFile, start: Optional[float], end: Optional[float]) -> np.ndarray:
    """The samples ffmpeg's ``-f s16le`` gives for a mono file already at the output rate, divided by 32768;
    returns float32 ``(n_samples,)``.

    libswresample converts 24/32-bit integers to 16 bits by dropping their low bits, as libsndfile's ``int16`` reads
    do, and floats by rounding ``x * 32768`` to the nearest integer (ties to even, as ``lrintf``) and clipping.
    Peak memory is one copy of the output plus one block: the output is preallocated from the header's frame count,
    bounded by what the file's size can honestly hold.
    """
    rate, total = int(f.samplerate), int(f.frames)
    first, last = _span_samples(start, end, rate)
    if first >= total:
        raise _past_the_end(name, "start", start or 0.0, total / rate)
    if last is not None and last > total + _END_TOLERANCE_S * rate:
        raise _past_the_end(name, "end", end or 0.0, total / rate)
    last = total if last is None else min(last, total)
    floats = f.subtype in _FLOAT_SUBTYPES
    output = _Output(min(last - first, _honest_samples(name)))
    repaired = 0
    if first:
        f.seek(first)
    for block in _blocks(f, last - first, "float64" if floats else "int16"):
        if floats:
            repaired += _repair_non_finite(block)
            block = np.clip(np.rint(block * 32768.0), -32768.0, 32767.0)
        output.append(block[:, 0] / np.float32(32768.0))
    if output.size == 0:
        raise AudioError(f"audio file '{name}' holds no audio samples, expected at least one")
    if end is not None and (first + output.size) / rate < end - _END_TOLERANCE_S:  # the header promised more
        raise _past_the_end(name, "end", end, (first + output.size) / rate)
    _warn_repaired(name, repaired)
    return output.result()


def _blocks(f: sf.SoundFile, frames: int, dtype: str) -> Iterator[np.ndarray]:
    """Up to ``frames`` frames of ``f`` as ``(frames, channels)`` blocks of ``dtype``, ending at the first short
    read: a header may claim more frames than the file holds (soundfile's own ``blocks`` would then go on yielding
    its stale buffer for every frame claimed)."""
    while frames > 0:
        wanted = min(_BLOCK_FRAMES, frames)
        block = f.read(wanted, dtype=dtype, always_2d=True)
        if block.shape[0]:
            yield block
        if block.shape[0] < wanted:
            return
        frames -= wanted


def _honest_samples(name: str) -> int:
    """The most output samples a file of this size is preallocated for: `_SAMPLES_PER_BYTE` per byte plus one
    second. Honest PCM files stay under it; one that decodes to more (silence in FLAC) grows its buffer as it
    goes."""
    try:
        size = os.path.getsize(name)
    except OSError:
        size = 0
    return _SAMPLES_PER_BYTE * size + SAMPLE_RATE


def _repair_non_finite(block: np.ndarray) -> int:
    """Set NaN samples of ``block`` to 0 and infinities to full scale (+-1), in place; returns how many samples
    were repaired."""
    bad = int(block.size - np.count_nonzero(np.isfinite(block)))
    if bad:
        np.nan_to_num(block, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return bad


def _warn_repaired(name: str, repaired: int) -> None:
    if repaired:
        warnings.warn(
            f"audio file '{name}' holds {repaired} non-finite samples (NaN or infinite); read NaN as silence and "
            "infinities as full scale",
            stacklevel=4,
        )


def _repaired_floats(name: str, f: sf.SoundFile) -> Optional[Tuple[np.ndarray, int]]:
    """For a float file ffmpeg is to resample or mix: None when every sample is finite (ffmpeg then decodes the file
    itself), else all its frames, float32 ``(frames, channels)`` with NaN and infinities repaired, and its rate.

    ffmpeg would turn a NaN into a full-scale click and its resampler would spread it over its filter length, so a
    damaged file is repaired here and its samples are handed to ffmpeg instead of the file.
    """
    if all(np.isfinite(block).all() for block in _blocks(f, int(f.frames), "float32")):
        return None
    f.seek(0)
    blocks = list(_blocks(f, int(f.frames), "float32"))
    _warn_repaired(name, sum(_repair_non_finite(block) for block in blocks))
    return np.concatenate(blocks), int(f.samplerate)


# ----------------------------------------------------------------------------------------------------------------------
# ffmpeg


def _ffmpeg_input(name: str) -> str:
    # "file:" makes ffmpeg take the name as a local path: without it "take:2.wav" would be read as protocol "take".
    # The "file:" protocol needs a full path to be unambiguous, hence abspath.
    return "file:" + os.path.abspath(name)


def _ffmpeg_reason(stderr: Optional[bytes], input_arg: str) -> str:
    """Last non-empty line of ffmpeg's stderr, without the "<input>: " prefix ffmpeg puts before file errors."""
    lines = [line.strip() for line in (stderr or b"").decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "ffmpeg exited with an error and printed nothing"
    reason = lines[-1]
    for prefix in (input_arg + ": ", input_arg[len("file:") :] + ": "):
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
    return one_line(reason, 200)


def _ffmpeg_command(
    name: str, sample_rate: int, first: int, last: Optional[int], repaired: Optional[Tuple[np.ndarray, int]]
) -> ffmpeg.nodes.OutputStream:
    """ffmpeg-python's command: upstream's arguments, plus, for a cut to output samples ``[first, last)``, an
    ``atrim`` filter, and for ``repaired`` frames (float32 ``(frames, channels)`` and their rate) a raw input on
    stdin instead of the file.

    The cut counts samples, after the conversion to ``sample_rate`` mono 16-bit (``aformat`` makes the same one
    libswresample step upstream's output does, then ``atrim`` runs on its output): so it slices the full decoding
    exactly.  Time-based cuts (``-ss``/``-t``) would not: they count from timestamp 0, and a stream whose first
    decoded sample comes later (Vorbis drops its first packet's output) would be shifted.  ffmpeg stops decoding at
    ``last``; what precedes ``first`` is decoded and dropped.
    """
    if repaired is None:
        stream = ffmpeg.input(_ffmpeg_input(name), threads=0)
    else:
        stream = ffmpeg.input("pipe:", format="f32le", ar=repaired[1], ac=repaired[0].shape[1])
    cut = {}
    if first or last is not None:
        trim = f"start_sample={first}" + ("" if last is None else f":end_sample={last}")
        cut["af"] = f"aformat=sample_fmts=s16:sample_rates={sample_rate}:channel_layouts=mono,atrim={trim}"
    output = stream.output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None, **cut)
    return output.global_args("-nostdin", "-hide_banner", "-loglevel", "error")


def _decode_with_ffmpeg(
    name: str,
    sample_rate: int,
    start: Optional[float],
    end: Optional[float],
    repaired: Optional[Tuple[np.ndarray, int]] = None,
) -> np.ndarray:
    """Decode with an ffmpeg subprocess to 16-bit mono at ``sample_rate`` (upstream's arguments), divided by 32768;
    returns float32 ``(n_samples,)``.  ``repaired`` (frames and rate) replaces the file as ffmpeg's input."""
    try:
        exe = ffmpeg_executable()
    except AudioError as exc:
        raise AudioError(f"audio file '{name}' could not be decoded by ffmpeg ({exc})") from None
    first, last = _span_samples(start, end, sample_rate)
    command = _ffmpeg_command(name, sample_rate, first, last, repaired)
    stdin = None if repaired is None else repaired[0].tobytes()
    try:
        stdout, _ = command.run(cmd=exe, input=stdin, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        reason = _ffmpeg_reason(exc.stderr, _ffmpeg_input(name))
        raise AudioError(f"audio file '{name}' could not be decoded by ffmpeg ({reason})") from None
    except OSError as exc:
        raise AudioError(f"audio file '{name}' could not be decoded: running '{exe}' failed ({exc})") from None

    usable = len(stdout) // 2  # a killed ffmpeg could leave half a sample
    # astype makes the one float32 copy and the division is in place; the bytes (half its size) are freed here.
    audio = np.frombuffer(stdout, dtype="<i2", count=usable).astype(np.float32)
    del stdout
    audio /= np.float32(32768.0)
    if audio.size == 0:
        if first:
            raise _past_the_end(name, "start", start or 0.0, None)
        raise AudioError(f"audio file '{name}' holds no audio samples, expected at least one")
    if last is not None and audio.size < last - first - _END_TOLERANCE_S * sample_rate:
        raise _past_the_end(name, "end", end or 0.0, (first + audio.size) / sample_rate)
    return audio


def _ffprobe_duration(name: str) -> Optional[float]:
    """Container duration in seconds via ffprobe; ``None`` when ffprobe is not on PATH or the container records none.

    Raises:
        AudioError: ffprobe cannot open the file.
    """
    ffprobe = shutil.which("ffprobe")
    if not ffprobe:
        return None
    input_arg = _ffmpeg_input(name)
    try:
        value = ffmpeg.probe(input_arg, cmd=ffprobe).get("format", {}).get("duration")
        return float(value) if value not in (None, "N/A") else None
    except ffmpeg.Error as exc:
        reason = _ffmpeg_reason(exc.stderr, input_arg)
        raise AudioError(f"audio file '{name}' could not be read by ffprobe ({reason})") from None
    except (OSError, ValueError):
        return None  # a broken ffprobe or odd output: decode instead
