"""Decode audio files into the 16 kHz mono float32 waveform Whisper models consume.

Two decoders are used, cheapest first:

* ``soundfile`` (libsndfile) decodes WAV, FLAC, OGG/Vorbis/Opus, MP3 and the other formats it knows in-process, with
  no subprocess; channels are averaged to mono and the signal is resampled with ``soxr``.
* ``ffmpeg`` (the system binary if one is on ``PATH``, else the one bundled with ``imageio-ffmpeg``), driven through
  ``ffmpeg-python``, handles everything else (MP4/M4A/AAC, WebM, MKV, video files, ...) and any file libsndfile
  refuses.  It pipes mono 16-bit PCM at the target rate to stdout, exactly as upstream Whisper does.

Upstream ``whisper.audio.load_audio`` always shells out to ffmpeg and returns ``int16 / 32768``; for 16-bit PCM at
16 kHz the soundfile path returns exactly those values (libsndfile also scales by 1/32768), so results agree.

Every failure is raised as :class:`whisper_rope.errors.AudioError` with one sentence naming the file.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from typing import Iterator, Optional, Tuple

import ffmpeg  # ffmpeg-python: builds the command line and runs it
import numpy as np
import soundfile as sf
import soxr

from whisper_rope.errors import AudioError, PathLike, one_line

__all__ = ["SAMPLE_RATE", "load_audio", "audio_duration", "ffmpeg_executable"]


#: Sample rate (Hz) every Whisper model expects.
SAMPLE_RATE: int = 16000

# Containers/codecs libsndfile cannot read; sending them straight to ffmpeg saves a failed open and keeps the error
# message about ffmpeg alone.  Anything not listed is still tried with soundfile first and falls back to ffmpeg.
_FFMPEG_ONLY_SUFFIXES = frozenset(
    {
        ".3gp",
        ".aac",
        ".ac3",
        ".amr",
        ".avi",
        ".flv",
        ".m4a",
        ".m4b",
        ".m4v",
        ".mka",
        ".mkv",
        ".mov",
        ".mp4",
        ".mpeg",
        ".mpg",
        ".ts",
        ".webm",
        ".wma",
        ".wmv",
    }
)

# Frames per soundfile read: ~6 s at 44.1 kHz, small next to an hour of audio (so a long file never exists as
# float32 multichannel at its native rate) yet large enough that per-block overhead is negligible.
_BLOCK_FRAMES = 1 << 18

# Output samples preallocated per byte of file at most (see `_honest_samples`): a header's frame count is a claim,
# and a FLAC header claiming 2**36 samples must not reserve 256 GiB.
_SAMPLES_PER_BYTE = 8

# soxr "HQ" is 20-bit precision (~120 dB stop-band rejection).  The log-mel features Whisper sees are clamped to an
# 80 dB range below their peak, so "VHQ" (28-bit) would only add CPU time with no effect on what the model sees.
_RESAMPLE_QUALITY = "HQ"

# How far a requested ``end`` may run past the last sample before it is an error rather than clamped: manifests round
# segment times (often to 10 ms), and a compressed file's reported length can differ from what decodes by up to one
# codec frame (1152 samples = 26 ms for MP3 at 44.1 kHz).
_END_TOLERANCE_S = 0.05

# Seconds decoded (and discarded) before ``start`` on the ffmpeg path, so the inaccurate fast input seek lands safely
# before the span and the accurate output seek does the rest; many codec frames long, yet cheap to decode.
_FFMPEG_PRE_ROLL_S = 1.0


class _DecoderFailed(Exception):
    """Internal: one decoder could not read the file; the message is a short reason, used in the AudioError."""


class _NoSamples(_DecoderFailed):
    """Internal: the file decoded without error but holds zero samples (e.g. a WAV header with no data)."""


def ffmpeg_executable() -> str:
    """Return the path of the ffmpeg binary used for formats soundfile cannot decode.

    The system ``ffmpeg`` on ``PATH`` is preferred (it usually has the most codecs and matches what upstream Whisper
    runs); otherwise the static binary shipped inside the ``imageio-ffmpeg`` wheel is used, so a plain
    ``pip install`` works on machines without ffmpeg.  Looked up on every call (cheap) so a changed ``PATH`` counts.

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
    """Decode an audio (or video) file to a mono float32 waveform.

    Args:
        path: file to decode.  WAV/FLAC/OGG/MP3 and other libsndfile formats are read in-process; MP4/M4A/WebM/...
            and anything libsndfile rejects are decoded by ffmpeg.
        sample_rate: output rate in Hz (Whisper uses 16000).
        start: first second to decode (``None``: from the beginning), e.g. a manifest segment's start.
        end: second to stop at, exclusive (``None``: to the end of the file).  Up to 50 ms past the end of the
            audio is clamped; further is an error.

    Returns:
        Array of shape ``(n_samples,)``, dtype float32, values in [-1, 1], at ``sample_rate`` Hz; multichannel input
        is averaged over channels.  ``n_samples`` is about ``(end - start) * sample_rate``.  For 16-bit PCM already
        at ``sample_rate`` this equals upstream ``whisper.audio.load_audio`` exactly.  Peak memory is about one
        copy of the result on the soundfile path and two on the ffmpeg path (an hour at 16 kHz is 230 MB each).

    Raises:
        AudioError: the file is missing, a directory, empty, undecodable by both decoders, holds no samples, or
            ``start``/``end`` are negative, out of order, or beyond the audio.
    """
    name = os.fspath(path)
    _check_sample_rate(name, sample_rate)
    _check_file(name)
    _check_span(name, start, end)

    soundfile_reason: Optional[str] = None
    if _suffix(name) not in _FFMPEG_ONLY_SUFFIXES:
        try:
            return _decode_with_soundfile(name, sample_rate, start, end)
        except _DecoderFailed as exc:
            soundfile_reason = str(exc)

    try:
        return _decode_with_ffmpeg(name, sample_rate, start, end)
    except _NoSamples:
        # ffmpeg read the container fine, so whatever soundfile said, the file is valid but empty.
        raise AudioError(f"audio file '{name}' holds no audio samples, expected at least one") from None
    except _DecoderFailed as exc:
        if soundfile_reason is None:
            raise AudioError(f"audio file '{name}' could not be decoded by ffmpeg ({exc})") from None
        raise AudioError(
            f"audio file '{name}' could not be decoded: soundfile failed ({soundfile_reason}) and ffmpeg failed ({exc})"
        ) from None


def audio_duration(path: PathLike) -> float:
    """Return the length of an audio file in seconds without decoding it (where the container says).

    Uses libsndfile's header (exact frame count) when it can read the file, else ffprobe's container duration when
    ``ffprobe`` is on PATH, else the ``Duration:`` line ffmpeg prints (10 ms resolution); only when the container
    records no duration is the file decoded.

    Args:
        path: audio or video file.

    Returns:
        Duration in seconds (float, > 0).

    Raises:
        AudioError: the file is missing, a directory, empty, or neither decoder can read it.
    """
    name = os.fspath(path)
    _check_file(name)
    if _suffix(name) not in _FFMPEG_ONLY_SUFFIXES:
        try:
            with _quiet_c_stderr(name):
                info = sf.info(name)
            if info.samplerate > 0 and info.frames > 0:
                return info.frames / info.samplerate
        except (sf.SoundFileError, RuntimeError, OSError, TypeError):
            pass  # not a libsndfile format: ask ffmpeg below
    duration = _ffmpeg_container_duration(name)
    if duration is not None and duration > 0:
        return duration
    # No duration in the container (e.g. raw ADTS streams): decoding is the only way to know.
    return load_audio(name).shape[0] / SAMPLE_RATE


# ----------------------------------------------------------------------------------------------------------------------
# argument and file checks


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


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


def _span_frames(name: str, start: Optional[float], end: Optional[float], rate: int, total: int) -> Tuple[int, int]:
    """Convert ``start``/``end`` seconds to a frame range ``[first, last)`` of a file with ``total`` frames."""
    length_s = total / rate
    first = 0 if start is None else int(round(start * rate))
    if first >= total:
        raise AudioError(
            f"start {start:g} s is at or past the end of audio file '{name}', which is {length_s:.3f} s long"
        )
    if end is None:
        return first, total
    if end > length_s + _END_TOLERANCE_S:
        raise AudioError(f"end {end:g} s is past the end of audio file '{name}', which is {length_s:.3f} s long")
    # max(): a span shorter than one input frame still yields a sample rather than an empty array.
    return first, max(first + 1, min(total, int(round(end * rate))))


# ----------------------------------------------------------------------------------------------------------------------
# soundfile decoder


# Suffixes libsndfile hands to a bundled C decoder (libmpg123) that prints its own warnings straight to the process's
# stderr (e.g. "[src/libmpg123/parse.c:...] warning: Cannot read next header"), bypassing our one-line reports.
_CHATTY_SUFFIXES = frozenset({".mp3", ".mp2", ".mp1", ".mpga"})

_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_c_stderr(name: str) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null while a chatty C decoder reads ``name``; a no-op for other files."""
    if _suffix(name) not in _CHATTY_SUFFIXES:
        yield
        return
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        saved = devnull = None
        try:
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        except OSError:  # no fd 2 or no /dev/null: read with the library's output as it is
            pass
        try:
            yield
        finally:
            if saved is not None:
                if devnull is not None:
                    os.dup2(saved, 2)
                    os.close(devnull)
                os.close(saved)


# libsndfile's message for any failed open of a file it routes to a codec library (MP3), whatever the cause.
_MISLEADING_OPEN_ERROR = "does not exist or is not a regular file"


def _soundfile_reason(exc: BaseException, name: Optional[str] = None) -> str:
    # LibsndfileError carries libsndfile's own message ("Format not recognised."); str() adds "Error opening '...'".
    reason = one_line(str(getattr(exc, "error_string", "") or exc).rstrip("."), 200) or type(exc).__name__
    if name is not None and _MISLEADING_OPEN_ERROR in reason.lower() and os.path.isfile(name):
        return "its data is not a stream libsndfile recognises (corrupt or not audio)"
    return reason


class _Output:
    """Growable float32 buffer that blocks are copied into, so the result exists once rather than as a list of
    chunks plus their concatenation."""

    def __init__(self, expected: int) -> None:
        self.buffer = np.empty(max(expected, 1), dtype=np.float32)
        self.size = 0

    def append(self, chunk: np.ndarray) -> None:
        end = self.size + chunk.shape[0]
        if end > self.buffer.shape[0]:
            # Only when a decoder yields more than its header promised; grow by 25% to keep appends amortized O(1).
            grown = np.empty(max(end, self.buffer.shape[0] * 5 // 4), dtype=np.float32)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : end] = chunk
        self.size = end

    def result(self) -> np.ndarray:
        return self.buffer[: self.size]


def _decode_with_soundfile(name: str, sample_rate: int, start: Optional[float], end: Optional[float]) -> np.ndarray:
    """Read with libsndfile in blocks, repair non-finite samples, average channels, stream-resample; returns float32
    ``(n_samples,)``.

    Peak memory is one copy of the output plus one block (a few MB), whatever the input's rate and channel count:
    the output is preallocated from the header's frame count (bounded by what the file's size can honestly hold, so
    that a header claiming days of samples costs nothing) and every block is mixed down and resampled before the
    next is read.
    """
    repaired = 0
    try:
        with _quiet_c_stderr(name), sf.SoundFile(name) as f:
            in_rate, total = int(f.samplerate), int(f.frames)
            if total <= 0:
                # Let ffmpeg have a go (libsndfile reports 0 frames for some streams it cannot size); if it also
                # finds nothing, the "no samples" error applies.
                raise _DecoderFailed("file holds no audio frames")
            first, last = _span_frames(name, start, end, in_rate, total)
            if first > 0:
                f.seek(first)
            resampler = None
            if in_rate != sample_rate:
                resampler = soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32", quality=_RESAMPLE_QUALITY)
            # soxr emits round(n * ratio) samples in total; the slack covers rounding.
            output = _Output(min(math.ceil((last - first) * sample_rate / in_rate) + 16, _honest_samples(name)))
            read = 0
            for block in _blocks(f, last - first):
                read += block.shape[0]
                repaired += _repair_non_finite(block)
                # (frames, channels) -> (frames,): plain average, as ffmpeg's `-ac 1` does for stereo.
                mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
                mono = np.ascontiguousarray(mono)
                output.append(mono if resampler is None else resampler.resample_chunk(mono))
            if resampler is not None:
                # Flush the filter's delay line; without it the last few ms of audio would be dropped.
                output.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    except (AudioError, _DecoderFailed):
        raise
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError) as exc:
        raise _DecoderFailed(_soundfile_reason(exc, name)) from None

    audio = output.result()
    if audio.size == 0:
        raise _DecoderFailed("file holds no audio frames")
    if end is not None and (first + read) / in_rate < end - _END_TOLERANCE_S:  # the header promised more
        raise AudioError(
            f"end {end:g} s is past the end of audio file '{name}', which is {(first + read) / in_rate:.3f} s long"
        )
    if repaired:
        warnings.warn(
            f"audio file '{name}' holds {repaired} non-finite samples (NaN or infinite); read NaN as silence and "
            "infinities as full scale",
            stacklevel=3,
        )
    # Float files may exceed full scale and resampling overshoots near full-scale peaks; the contract is [-1, 1].
    return np.clip(audio, -1.0, 1.0, out=audio)


def _blocks(f: sf.SoundFile, frames: int) -> Iterator[np.ndarray]:
    """Up to ``frames`` frames of ``f`` as float32 ``(frames, channels)`` blocks, ending at the first short read:
    a header may claim more frames than the file holds (soundfile's own ``blocks`` would then go on yielding its
    stale buffer for every frame claimed)."""
    while frames > 0:
        wanted = min(_BLOCK_FRAMES, frames)
        block = f.read(wanted, dtype="float32", always_2d=True)
        if block.shape[0]:
            yield block
        if block.shape[0] < wanted:
            return
        frames -= wanted


def _honest_samples(name: str) -> int:
    """The most output samples a file of this size is preallocated for: `_SAMPLES_PER_BYTE` per byte plus one
    second. Honest files stay under it (a 32 kbit/s MP3 makes 4 samples per byte at 16 kHz); one that decodes to
    more (silence in FLAC) grows its buffer as it goes."""
    try:
        size = os.path.getsize(name)
    except OSError:
        size = 0
    return _SAMPLES_PER_BYTE * size + SAMPLE_RATE


def _repair_non_finite(block: np.ndarray) -> int:
    """Set NaN samples of ``block`` to 0 and infinities to full scale (+-1), in place, as ffmpeg's conversion to
    16-bit PCM (upstream's decoding) reads them; returns how many samples were repaired."""
    bad = int(block.size - np.count_nonzero(np.isfinite(block)))
    if bad:
        np.nan_to_num(block, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return bad


# ----------------------------------------------------------------------------------------------------------------------
# ffmpeg decoder


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


def _decode_with_ffmpeg(name: str, sample_rate: int, start: Optional[float], end: Optional[float]) -> np.ndarray:
    """Decode with an ffmpeg subprocess to mono float32 at ``sample_rate``; returns ``(n_samples,)``.

    ``start`` is split into a coarse input seek to ``_FFMPEG_PRE_ROLL_S`` before it (fast: the skipped part is not
    decoded) and a fine output seek for the rest (decoded, so sample-accurate); ``end`` becomes the output ``-t``.
    An input seek alone is not accurate everywhere: ffmpeg 7 (imageio-ffmpeg's binary) lands up to one AAC frame
    (~23 ms) late in M4A files, while ffmpeg 5 does not.

    The output is s16le, as upstream Whisper asks for, not f32le: for float output ffmpeg's stereo-to-mono matrix
    is not normalized (each channel weighted 1/sqrt(2), so mono comes out 3 dB louder than the average), while for
    16-bit output it is the plain average.  s16le therefore gives both the average and upstream's exact samples;
    16-bit resolution (96 dB) is well beyond the 80 dB range of Whisper's log-mel features.
    """
    try:
        exe = ffmpeg_executable()
    except AudioError as exc:
        raise _DecoderFailed(str(exc)) from None

    input_arg = _ffmpeg_input(name)
    input_options = {}
    output_options = {}
    if start:
        coarse = max(0.0, start - _FFMPEG_PRE_ROLL_S)
        if coarse > 0:
            input_options["ss"] = f"{coarse:.6f}"
        output_options["ss"] = f"{start - coarse:.6f}"
    if end is not None:
        output_options["t"] = f"{end - (start or 0.0):.6f}"
    command = (
        ffmpeg.input(input_arg, **input_options)
        .output("pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None, **output_options)
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
    )
    try:
        stdout, _ = command.run(cmd=exe, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        raise _DecoderFailed(_ffmpeg_reason(exc.stderr, input_arg)) from None
    except OSError as exc:
        raise _DecoderFailed(f"could not run '{exe}': {exc.strerror or exc}") from None

    usable = len(stdout) // 2  # a killed ffmpeg could leave half a sample
    # int16 / 32768 lies in [-1, 1) by construction.  astype makes the one float32 copy and the division is in place;
    # the bytes (half its size) are freed here.
    audio = np.frombuffer(stdout, dtype="<i2", count=usable).astype(np.float32)
    del stdout
    audio /= np.float32(32768.0)

    if audio.size == 0:
        if start:
            try:
                length = _ffmpeg_container_duration(name)
            except AudioError:
                length = None  # the length only decorates the message; the error below stands regardless
            said = f", which is {length:.3f} s long" if length else ""
            raise AudioError(f"start {start:g} s is at or past the end of audio file '{name}'{said}")
        raise _NoSamples("it decoded to no audio samples")
    if end is not None:
        got_s = audio.size / sample_rate
        wanted_s = end - (start or 0.0)
        if got_s < wanted_s - _END_TOLERANCE_S:
            raise AudioError(
                f"end {end:g} s is past the end of audio file '{name}', which is {(start or 0.0) + got_s:.3f} s long"
            )
    return audio


_DURATION_LINE = re.compile(r"Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


def _ffmpeg_container_duration(name: str) -> Optional[float]:
    """Container duration in seconds via ffprobe (if on PATH) or ffmpeg's banner; ``None`` if none is recorded.

    Raises:
        AudioError: ffmpeg cannot open the file, or no ffmpeg is available.
    """
    input_arg = _ffmpeg_input(name)
    ffprobe = shutil.which("ffprobe")
    if ffprobe:
        try:
            probe = ffmpeg.probe(input_arg, cmd=ffprobe)
            value = probe.get("format", {}).get("duration")
            return float(value) if value not in (None, "N/A") else None
        except ffmpeg.Error as exc:
            raise AudioError(
                f"audio file '{name}' could not be read by ffprobe ({_ffmpeg_reason(exc.stderr, input_arg)})"
            ) from None
        except (OSError, ValueError):
            pass  # broken ffprobe or odd output: fall through to ffmpeg

    exe = ffmpeg_executable()
    try:
        # With no output file ffmpeg prints the input's header then exits non-zero ("At least one output file must
        # be specified"); the header is all we need, so the exit status is ignored.  ffmpeg-python cannot express a
        # command without an output, hence plain subprocess here.
        stderr = subprocess.run(
            [exe, "-nostdin", "-hide_banner", "-i", input_arg], capture_output=True, check=False
        ).stderr
    except OSError as exc:
        raise AudioError(f"audio file '{name}' could not be probed: running '{exe}' failed ({exc.strerror})") from None
    text = stderr.decode("utf-8", "replace")
    match = _DURATION_LINE.search(text)
    if match:
        hours, minutes, seconds = match.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if "Duration: N/A" in text:
        return None
    raise AudioError(f"audio file '{name}' could not be read by ffmpeg ({_ffmpeg_reason(stderr, input_arg)})")
