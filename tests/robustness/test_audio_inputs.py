"""Unusual audio: empty, tiny, silent, clipped, foreign and hour-long files, odd rates, channels and names.

`whisper_rope.audio.load_audio` must return 16 kHz mono float32 in [-1, 1] or raise `AudioError` with one line
naming the file; ``whisper-rope transcribe`` must report each bad input in one line, still transcribe the others,
and exit non-zero when any failed. The hour-long file is decoded in a child process whose peak resident set is
reported (docs/reliability.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import soundfile as sf
import whisper.audio

from whisper_rope.audio import SAMPLE_RATE, load_audio
from whisper_rope.errors import AudioError

from . import (
    LONG,
    REPO,
    assert_clear_message,
    random_model,  # noqa: F401  (a pytest fixture, requested by name)
    subprocess_env,
    transcribe,
)

HELLO = REPO / "tests" / "fixtures" / "hello.flac"
M4A = REPO / "tests" / "fixtures" / "formats" / "clip.m4a"
# Names with spaces, non-ASCII letters, a leading dash (an ffmpeg option, were it passed bare) and a colon (an
# ffmpeg protocol prefix).
AWKWARD_NAMES = ["with space.wav", "données ünïcødé 日本語.wav", "-y.wav", "take:2.wav", "-i clip ü.m4a"]


def _tone(seconds: float, rate: int, channels: int = 1, frequency: float = 440.0, level: float = 0.5) -> np.ndarray:
    """(frames, channels) float64: a sine, each channel at a different phase so that averaging is visible."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([level * np.sin(2 * np.pi * frequency * t + c) for c in range(channels)], axis=1)


def _dominant_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


def _bad_files(folder: Path) -> Dict[str, Path]:
    """Inputs that are not decodable audio, each with the reason that load_audio must give."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["empty (0 bytes)"] = folder / "empty.wav"
    files["empty (0 bytes)"].write_bytes(b"")
    files["holds no audio samples"] = folder / "header-only.wav"
    sf.write(files["holds no audio samples"], np.zeros(0, dtype=np.int16), SAMPLE_RATE, subtype="PCM_16")
    for suffix in (".wav", ".flac", ".ogg", ".m4a"):
        # One name each: the CLI refuses inputs whose transcripts would share a name (random.txt).
        files[f"could not be decoded ({suffix} of random bytes)"] = folder / f"random-{suffix[1:]}{suffix}"
        files[f"could not be decoded ({suffix} of random bytes)"].write_bytes(rng.bytes(5000))
    files["is a directory"] = folder / "folder.wav"
    files["is a directory"].mkdir(exist_ok=True)
    files["does not exist"] = folder / "missing.wav"
    files["could not be decoded (text)"] = folder / "notes.txt"
    files["could not be decoded (text)"].write_text("not audio\n")
    files["could not be decoded (PNG named .m4a)"] = folder / "picture.m4a"
    files["could not be decoded (PNG named .m4a)"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    video = folder / "video-without-audio.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=c=black:s=32x32:d=1",
            "-c:v",
            "mpeg4",
            str(video),
        ],
        check=True,
    )
    files["could not be decoded (video with no audio stream)"] = video
    return files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Dict[str, Path]:
    return _bad_files(tmp_path_factory.mktemp("bad"))


def test_undecodable_inputs_raise_one_line_audio_errors_naming_the_file(bad_files):
    for reason, path in bad_files.items():
        with pytest.raises(AudioError) as refused:
            load_audio(path)
        message = assert_clear_message(refused.value)
        assert str(path) in message, (reason, message)
        assert reason.split(" (")[0] in message, (reason, message)


def test_one_sample_at_16_khz_is_that_sample(tmp_path):
    path = tmp_path / "one.wav"
    sf.write(path, np.array([0.25]), SAMPLE_RATE, subtype="PCM_16")
    assert load_audio(path).tolist() == [0.25]


def test_digital_silence_decodes_to_exact_zeros(tmp_path):
    for suffix in (".wav", ".flac"):
        path = tmp_path / f"silence{suffix}"
        sf.write(path, np.zeros(10 * SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
        audio = load_audio(path)
        assert audio.shape == (10 * SAMPLE_RATE,) and not audio.any()


def test_clipped_and_over_full_scale_input_stays_within_plus_minus_one(tmp_path):
    square = np.sign(_tone(2.0, 44100)[:, 0])  # full-scale square wave: resampling overshoots its edges
    sf.write(tmp_path / "square.wav", square, 44100, subtype="PCM_16")
    sf.write(tmp_path / "hot.wav", 4.0 * square, 16000, subtype="FLOAT")  # float WAV at four times full scale
    for name in ("square.wav", "hot.wav"):
        audio = load_audio(tmp_path / name)
        assert audio.dtype == np.float32 and float(np.abs(audio).max()) <= 1.0
        assert float(np.abs(audio).max()) > 0.9


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_other_sample_rates_are_resampled_keeping_length_and_pitch(tmp_path, rate):
    path = tmp_path / f"tone{rate}.wav"
    sf.write(path, _tone(3.0, rate), rate, subtype="PCM_16")
    audio = load_audio(path)
    assert abs(audio.shape[0] - 3 * SAMPLE_RATE) <= 1
    assert abs(_dominant_frequency(audio, SAMPLE_RATE) - 440.0) < 1.0


@pytest.mark.parametrize("channels", [2, 6])
def test_multichannel_input_is_mixed_down_as_upstream_mixes_it(tmp_path, channels):
    frames = _tone(1.0, SAMPLE_RATE, channels)
    path = tmp_path / f"ch{channels}.wav"
    sf.write(path, frames, SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    np.testing.assert_array_equal(audio, whisper.audio.load_audio(str(path)))
    if channels == 2:  # the average, rounded to 16 bits
        np.testing.assert_allclose(audio, frames.mean(axis=1), atol=1 / 32768)
    else:  # ffmpeg's 5.1 downmix: the LFE channel is left out, the others weighted; not the plain average
        assert np.abs(audio - frames.mean(axis=1)).max() > 0.05


def test_opposite_stereo_channels_cancel_to_silence(tmp_path):
    left = _tone(1.0, 48000)[:, 0]
    path = tmp_path / "opposite.wav"
    sf.write(path, np.stack([left, -left], axis=1), 48000, subtype="PCM_16")
    assert float(np.abs(load_audio(path)).max()) < 1e-4


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_paths_with_spaces_non_ascii_dashes_and_colons_decode(tmp_path, name):
    folder = tmp_path / "dossier à espaces"
    folder.mkdir()
    source = M4A if name.endswith(".m4a") else HELLO
    path = folder / name
    shutil.copy(source, path)
    np.testing.assert_array_equal(load_audio(path), load_audio(source))


# ----------------------------------------------------------------------------------------------------------------
# An hour of audio, decoded in a child process


DECODE_SCRIPT = """
import json, sys, time
from whisper_rope.audio import load_audio

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

baseline = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here on
started = time.perf_counter()
audio = load_audio(sys.argv[1])
print(json.dumps({"samples": int(audio.shape[0]), "seconds": time.perf_counter() - started,
                  "baseline_mib": baseline / 1024, "peak_mib": kib("VmHWM") / 1024,
                  "output_mib": audio.nbytes / 2**20}))
"""


def _write_hour(path: Path, rate: int, channels: int, minutes: int = 60) -> None:
    """A tone with a little noise, written a minute at a time (never the whole hour in memory)."""
    rng = np.random.default_rng(0)
    minute = _tone(60.0, rate, channels, level=0.3)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, subtype="PCM_16") as out:
        for _ in range(minutes):
            out.write(minute + 0.01 * rng.standard_normal(minute.shape))


def _decode_in_child(path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", DECODE_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


HOUR_CASES = [("16 kHz mono WAV", 16000, 1, ".wav", 1.0)]
if LONG:
    # Through ffmpeg: resampling and mixing (FLAC), lossy codecs (MP3, M4A).
    HOUR_CASES += [
        ("44.1 kHz stereo FLAC (ffmpeg)", 44100, 2, ".flac", 2.0),
        ("16 kHz mono MP3 (ffmpeg)", 16000, 1, ".mp3", 2.0),
        ("16 kHz mono M4A (ffmpeg)", 16000, 1, ".m4a", 2.0),
    ]


@pytest.mark.parametrize("label, rate, channels, suffix, copies", HOUR_CASES, ids=[c[0] for c in HOUR_CASES])
def test_an_hour_of_audio_decodes_in_bounded_memory(tmp_path, label, rate, channels, suffix, copies):
    """Peak resident growth while decoding is at most ``copies`` copies of the float32 result plus 64 MiB:
    load_audio's documented bound (one copy in-process, two through ffmpeg)."""
    path = tmp_path / f"hour{suffix}"
    if suffix in (".wav", ".flac"):
        _write_hour(path, rate, channels)
    else:
        wav = tmp_path / "hour.wav"
        _write_hour(wav, rate, channels)
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-b:a", "32k", str(path)], check=True
        )
        wav.unlink()
    figures = _decode_in_child(path)
    growth = figures["peak_mib"] - figures["baseline_mib"]
    print(
        f"robustness: 60-minute {label} ({path.stat().st_size / 2**20:.0f} MiB file): decoded in "
        f"{figures['seconds']:.1f} s, peak RSS {figures['peak_mib']:.0f} MiB (baseline {figures['baseline_mib']:.0f}"
        f" MiB, growth {growth:.0f} MiB, result {figures['output_mib']:.0f} MiB)"
    )
    assert abs(figures["samples"] - 3600 * SAMPLE_RATE) <= SAMPLE_RATE // 10  # codec padding: under 0.1 s
    assert growth <= copies * figures["output_mib"] + 64


# ----------------------------------------------------------------------------------------------------------------
# The CLI: every bad input reported in one line, the good ones still transcribed


def _good_files(folder: Path) -> Dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in AWKWARD_NAMES:
        files[name] = folder / name
        shutil.copy(M4A if name.endswith(".m4a") else HELLO, files[name])
    writes = {
        "one-sample.wav": (np.array([[0.25]]), SAMPLE_RATE, "PCM_16"),
        "silence.wav": (np.zeros((5 * SAMPLE_RATE, 1)), SAMPLE_RATE, "PCM_16"),
        "clipped.wav": (4.0 * np.sign(_tone(2.0, SAMPLE_RATE)), SAMPLE_RATE, "FLOAT"),
        "stereo-48k.wav": (_tone(2.0, 48000, 2), 48000, "PCM_16"),
        "six-channels-8k.wav": (_tone(2.0, 8000, 6), 8000, "PCM_16"),
    }
    for name, (frames, rate, subtype) in writes.items():
        files[name] = folder / name
        sf.write(files[name], frames, rate, subtype=subtype)
    return files


def _report_lines(stderr: str) -> list:
    """stderr without the progress bars upstream's transcribe draws when --verbose is False."""
    return [line for line in stderr.splitlines() if line.strip() and not re.search(r"frames(/s)?\]|\d+%\|", line)]


def test_cli_reports_each_bad_input_in_one_line_and_still_transcribes_the_rest(
    tmp_path, capfd, random_model, bad_files
):
    good = _good_files(tmp_path / "good")
    inputs = [p for pair in zip(good.values(), bad_files.values()) for p in pair]  # interleaved
    inputs += list(good.values())[len(bad_files) :] + list(bad_files.values())[len(good) :]
    output = tmp_path / "out"
    assert transcribe(random_model, inputs, output) == 1
    captured = capfd.readouterr()  # the file descriptor: also what decoder libraries print themselves
    lines = _report_lines(captured.err)
    assert "Traceback" not in captured.err
    assert lines[-1] == f"whisper-rope: {len(bad_files)} of {len(inputs)} files failed"
    errors = lines[:-1]
    assert len(errors) == len(bad_files), "\n".join(errors)
    for line, path in zip(errors, [p for p in inputs if p in bad_files.values()]):
        assert line.startswith(f"whisper-rope: error: {path}: "), line
    written = sorted(p.name for p in output.iterdir())
    assert written == sorted([".whisper-rope-outputs.json"] + [Path(p).stem + ".txt" for p in good.values()])


def test_cli_reports_a_random_bytes_mp3_in_one_line(tmp_path, capfd, random_model):
    path = tmp_path / "random.mp3"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    assert transcribe(random_model, [path, HELLO], tmp_path / "out") == 1
    lines = _report_lines(capfd.readouterr().err)
    assert len(lines) == 2 and lines[0].startswith(f"whisper-rope: error: {path}: ") and "exist" not in lines[0]
