"""Tests of whisper_rope.audio: which decoder runs, channel mixing, cuts, ffmpeg discovery, errors, and the fixtures.
Parity with upstream's `whisper.audio.load_audio` is tested in test_audio_parity.py.

The format fixtures (tests/fixtures/formats/clip.*) are one 1.000 s 44.1 kHz stereo clip: left = speech, right =
a 440 Hz sine, so a loader that keeps one channel, or sums instead of averaging, changes the 440 Hz amplitude.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import soundfile as sf

from whisper_rope import audio
from whisper_rope.audio import SAMPLE_RATE, audio_duration, ffmpeg_executable, load_audio
from whisper_rope.errors import AudioError

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = FIXTURES / "formats"
SPEECH = FIXTURES / "speech"
HELLO = FIXTURES / "hello.flac"

# Samples per codec frame at the clips' 44.1 kHz; a decoder may legitimately differ from 1.000 s by up to one frame
# (encoder padding not trimmed, e.g. ffmpeg 5's AAC decoder keeps the last frame's padding).
CODEC_FRAME = {"wav": 0, "ogg": 1024, "mp3": 1152, "m4a": 1024}


def _frame_tolerance(ext: str) -> int:
    """One codec frame in 16 kHz output samples, plus one for rounding."""
    return int(np.ceil(CODEC_FRAME[ext] * SAMPLE_RATE / 44100)) + 1


def _tone_amplitude(signal: np.ndarray, rate: int, freq: float = 440.0) -> float:
    """Amplitude of the ``freq`` sinusoid in ``signal``: its projection on a sine and a cosine, over the whole
    periods it holds (the speech in the other channel is nearly orthogonal to it)."""
    n = int(len(signal) * freq / rate) * rate // int(freq)
    phase = 2 * np.pi * freq * np.arange(n) / rate
    return float(2 * np.hypot(signal[:n] @ np.sin(phase), signal[:n] @ np.cos(phase)) / n)


@pytest.fixture(scope="module")
def wav_reference() -> np.ndarray:
    """The stereo WAV read directly: float32, shape (44100, 2)."""
    data, rate = sf.read(FORMATS / "clip.wav", dtype="float32", always_2d=True)
    assert rate == 44100 and data.shape == (44100, 2)
    return data


@pytest.fixture(scope="module")
def decoded() -> Dict[str, np.ndarray]:
    """Each format clip decoded once (with whatever ffmpeg is found first)."""
    return {ext: load_audio(FORMATS / f"clip.{ext}") for ext in CODEC_FRAME}


# ---------------------------------------------------------------------------------------------------------------------
# formats, duration, mixing


@pytest.mark.parametrize("ext", sorted(CODEC_FRAME))
def test_each_format_decodes_to_16k_mono_float32(ext: str, decoded: Dict[str, np.ndarray]) -> None:
    signal = decoded[ext]
    assert signal.dtype == np.float32 and signal.ndim == 1
    assert np.all(np.abs(signal) <= 1.0)
    assert abs(signal.shape[0] - SAMPLE_RATE) <= _frame_tolerance(ext)
    # libsndfile's header for WAV; ffprobe's container duration (which counts MP3's encoder delay and padding,
    # 45 ms here) for the others: within the 50 ms a manifest's end may run past the audio.
    assert abs(audio_duration(FORMATS / f"clip.{ext}") - 1.0) <= audio._END_TOLERANCE_S


@pytest.mark.parametrize("ext", sorted(CODEC_FRAME))
def test_stereo_is_averaged(ext: str, decoded: Dict[str, np.ndarray], wav_reference: np.ndarray) -> None:
    # Average of the channels: half the right channel's tone.  Left only would give ~0, a sum twice this, and
    # ffmpeg's unnormalized float downmix 1/sqrt(2) of the sum.
    expected = _tone_amplitude(wav_reference[:, 1], 44100) / 2
    assert _tone_amplitude(decoded[ext], SAMPLE_RATE) == pytest.approx(expected, rel=0.12)


# ---------------------------------------------------------------------------------------------------------------------
# which decoder runs; ffmpeg discovery


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> Dict[str, int]:
    """Count calls of the two decoders while still running them."""
    calls = {"soundfile": 0, "ffmpeg": 0}
    real_sf, real_ff = audio._read_in_process, audio._decode_with_ffmpeg

    def counted_sf(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["soundfile"] += 1
        return real_sf(*args, **kwargs)

    def counted_ff(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["ffmpeg"] += 1
        return real_ff(*args, **kwargs)

    monkeypatch.setattr(audio, "_read_in_process", counted_sf)
    monkeypatch.setattr(audio, "_decode_with_ffmpeg", counted_ff)
    return calls


def test_16k_mono_pcm_stays_in_process(tmp_path: Path, decoder_calls: Dict[str, int]) -> None:
    wav = tmp_path / "hello.wav"
    sf.write(wav, sf.read(HELLO, dtype="int16")[0], SAMPLE_RATE, subtype="PCM_16")
    for path in (HELLO, wav, *sorted(SPEECH.glob("*.flac"))):
        load_audio(path)
    assert decoder_calls == {"soundfile": 10, "ffmpeg": 0}


@pytest.mark.parametrize("ext", sorted(CODEC_FRAME))
def test_other_rates_channels_and_codecs_go_through_ffmpeg(ext: str, decoder_calls: Dict[str, int]) -> None:
    load_audio(FORMATS / f"clip.{ext}")
    assert decoder_calls == {"soundfile": 0, "ffmpeg": 1}


def test_file_soundfile_rejects_goes_to_ffmpeg(tmp_path: Path, decoder_calls: Dict[str, int]) -> None:
    disguised = tmp_path / "actually_aac.wav"
    shutil.copyfile(FORMATS / "clip.m4a", disguised)
    np.testing.assert_array_equal(load_audio(disguised), load_audio(FORMATS / "clip.m4a"))
    assert decoder_calls == {"soundfile": 0, "ffmpeg": 2}


def test_imageio_ffmpeg_used_without_system_ffmpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decoded: Dict[str, np.ndarray]
) -> None:
    imageio_ffmpeg = importlib.import_module("imageio_ffmpeg")
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no ffmpeg, no ffprobe
    assert shutil.which("ffmpeg") is None
    assert ffmpeg_executable() == imageio_ffmpeg.get_ffmpeg_exe()

    signal = load_audio(FORMATS / "clip.m4a")
    assert signal.dtype == np.float32 and signal.ndim == 1
    assert abs(signal.shape[0] - SAMPLE_RATE) <= _frame_tolerance("m4a")
    n = min(len(signal), len(decoded["m4a"]))
    assert np.corrcoef(signal[:n], decoded["m4a"][:n])[0, 1] > 0.99
    # Without ffprobe the duration is the decoded length.
    assert audio_duration(FORMATS / "clip.m4a") == signal.shape[0] / SAMPLE_RATE


def test_no_ffmpeg_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    imageio_ffmpeg = importlib.import_module("imageio_ffmpeg")

    def no_binary() -> str:
        raise RuntimeError("No ffmpeg exe could be found")

    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    with pytest.raises(AudioError, match="no ffmpeg executable"):
        ffmpeg_executable()
    for ext in sorted(CODEC_FRAME):
        with pytest.raises(AudioError, match=f"clip.{ext}' could not be decoded by ffmpeg .no ffmpeg executable"):
            load_audio(FORMATS / f"clip.{ext}")
    # 16 kHz mono PCM is read in-process, with no ffmpeg at all.
    assert load_audio(HELLO).shape == (53200,)


# ---------------------------------------------------------------------------------------------------------------------
# start / end


@pytest.mark.parametrize("ext", sorted(CODEC_FRAME))
def test_start_end_slice(ext: str, decoded: Dict[str, np.ndarray]) -> None:
    path = FORMATS / f"clip.{ext}"
    # A cut is the full decoding's samples between round(start * 16000) and round(end * 16000), whatever the
    # stream's first timestamp (the Vorbis clip's first decoded sample is 128 input samples in).
    np.testing.assert_array_equal(load_audio(path, start=0.25, end=0.75), decoded[ext][4000:12000])
    np.testing.assert_array_equal(load_audio(path, start=0.5), decoded[ext][8000:])
    np.testing.assert_array_equal(load_audio(path, end=0.3), decoded[ext][:4800])


@pytest.mark.parametrize("which", ["system", "imageio"])
def test_ffmpeg_cut_equals_the_full_decoding_sliced(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The cut counts output samples after resampling (atrim after aformat), with Debian's ffmpeg 5.1 and
    # imageio-ffmpeg's newer build alike; an input seek would restart the resampler and AAC decoder elsewhere.
    if which == "system":
        assert shutil.which("ffmpeg"), "this test needs a system ffmpeg on PATH (CI installs Debian's ffmpeg)"
    if which == "imageio":
        importlib.import_module("imageio_ffmpeg")
        monkeypatch.delenv("IMAGEIO_FFMPEG_EXE", raising=False)
        monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    m4a = tmp_path / "hello.m4a"
    (
        audio.ffmpeg.input(str(HELLO))
        .output(str(m4a), acodec="aac", audio_bitrate="48k")
        .global_args("-nostdin", "-loglevel", "error")
        .run(cmd=ffmpeg_executable(), capture_stdout=True, capture_stderr=True)
    )
    full = load_audio(m4a)
    np.testing.assert_array_equal(load_audio(m4a, start=2.0, end=3.0), full[32000:48000])
    np.testing.assert_array_equal(load_audio(m4a, start=1.23456), full[19753:])


def test_slice_without_resampling_is_exact() -> None:
    full = load_audio(HELLO)
    np.testing.assert_array_equal(load_audio(HELLO, start=1.0, end=2.5), full[16000:40000])
    # An end within the 50 ms tolerance past the last sample is clamped, not an error.
    np.testing.assert_array_equal(load_audio(HELLO, start=3.0, end=3.35), full[48000:])


# ---------------------------------------------------------------------------------------------------------------------
# errors: always AudioError, always naming the file


def _bad_files(tmp_path: Path) -> Dict[str, Path]:
    (tmp_path / "a_directory.wav").mkdir()
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random_bytes.wav").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp_path / "random_bytes.m4a").write_bytes(np.random.default_rng(2).bytes(4096))
    sf.write(tmp_path / "no_samples.wav", np.zeros(0, dtype=np.int16), SAMPLE_RATE, subtype="PCM_16")
    return {
        "missing": tmp_path / "missing.wav",
        "directory": tmp_path / "a_directory.wav",
        "empty": tmp_path / "empty.wav",
        "random": tmp_path / "random_bytes.wav",
        "random_m4a": tmp_path / "random_bytes.m4a",
        "no_samples": tmp_path / "no_samples.wav",
    }


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("directory", "is a directory"),
        ("empty", "is empty"),
        ("random", "could not be decoded by ffmpeg"),
        ("random_m4a", "could not be decoded by ffmpeg"),
        ("no_samples", "holds no audio samples"),
    ],
)
def test_bad_file_raises_audio_error(tmp_path: Path, case: str, message: str) -> None:
    path = _bad_files(tmp_path)[case]
    with pytest.raises(AudioError, match=message) as info:
        load_audio(path)
    assert path.name in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    if case in ("missing", "directory", "empty", "random"):
        with pytest.raises(AudioError, match=path.name):
            audio_duration(path)


@pytest.mark.parametrize("ext", ["wav", "m4a"])
@pytest.mark.parametrize(
    "span, message",
    [
        ({"start": 0.8, "end": 0.2}, "must be after start"),
        ({"start": 0.5, "end": 0.5}, "must be after start"),
        ({"start": 3.0}, "at or past the end"),
        ({"start": 0.5, "end": 4.0}, "past the end"),
        ({"start": -1.0}, "must not be negative"),
        ({"end": float("nan")}, "finite number"),
    ],
)
def test_bad_span_raises_audio_error(ext: str, span: Dict[str, float], message: str) -> None:
    with pytest.raises(AudioError, match=message) as info:
        load_audio(FORMATS / f"clip.{ext}", **span)
    assert f"clip.{ext}" in str(info.value)


def test_bad_sample_rate() -> None:
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(HELLO, sample_rate=0)


def test_other_sample_rate() -> None:
    assert load_audio(FORMATS / "clip.wav", sample_rate=8000).shape == (8000,)
    assert load_audio(FORMATS / "clip.m4a", sample_rate=8000).shape[0] == pytest.approx(8000, abs=200)


# ---------------------------------------------------------------------------------------------------------------------
# the committed speech fixtures


def test_speech_fixtures_are_consistent() -> None:
    entries = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 8
    for entry in entries:
        path = SPEECH / entry["audio"]
        info = sf.info(path)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", SAMPLE_RATE, 1)
        assert 2.0 <= info.duration <= 5.0
        assert path.with_suffix(".txt").read_text().strip() == entry["text"]
        assert audio_duration(path) == pytest.approx(info.duration)
    info = sf.info(HELLO)
    assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1) and 2.5 <= info.duration <= 4.5
    hello_text = HELLO.with_suffix(".txt").read_text().strip()
    assert hello_text == "Hello world. This is a test of the speech recognition system."
