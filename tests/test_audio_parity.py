"""`whisper_rope.audio.load_audio` returns upstream's decoding, the one the models were trained on.

For every committed audio fixture (found by glob, so a new fixture is covered) the result has the length of
`whisper.audio.load_audio`'s and is within one 16-bit step of it, whole and cut (a cut equals slicing upstream's
full decoding).  Synthetic files cover what the fixtures do not: every sample format the in-process reader takes
(with ties and values past full scale), a file longer than one read block, and the channel counts and rates that
ffmpeg mixes and resamples.  Upstream runs the ffmpeg on PATH, so without one these tests fail; they never skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import soundfile as sf
import whisper.audio

from whisper_rope import audio
from whisper_rope.audio import SAMPLE_RATE, load_audio

FIXTURES = Path(__file__).parent / "fixtures"
NOT_AUDIO = {".txt", ".jsonl", ".sh", ".md"}
FIXTURE_AUDIO = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.suffix.lower() not in NOT_AUDIO)
STEP = 1 / 32768  # one 16-bit step: upstream's samples are int16 / 32768
CUTS = [(0.123, 0.8765), (0.5, None), (None, 0.3), (0.25, 0.75)]

_upstream: Dict[Path, np.ndarray] = {}


def upstream(path: Path) -> np.ndarray:
    """`whisper.audio.load_audio(path)`, decoded once per file."""
    if path not in _upstream:
        _upstream[path] = whisper.audio.load_audio(str(path))
    return _upstream[path]


def assert_parity(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert ours.shape == theirs.shape
    assert float(np.max(np.abs(ours - theirs))) <= STEP


def upstream_slice(path: Path, start: Optional[float], end: Optional[float]) -> np.ndarray:
    first = 0 if start is None else round(start * SAMPLE_RATE)
    return upstream(path)[first : None if end is None else round(end * SAMPLE_RATE)]


def test_ffmpeg_is_on_path_and_every_fixture_format_is_found() -> None:
    assert shutil.which("ffmpeg"), "upstream's load_audio runs the ffmpeg on PATH; install ffmpeg (CI installs it)"
    assert {p.suffix for p in FIXTURE_AUDIO} >= {".flac", ".wav", ".ogg", ".mp3", ".m4a"}


@pytest.mark.parametrize("path", FIXTURE_AUDIO, ids=[str(p.relative_to(FIXTURES)) for p in FIXTURE_AUDIO])
def test_every_fixture_decodes_as_upstream_whole_and_cut(path: Path) -> None:
    assert_parity(load_audio(path), upstream(path))
    for start, end in CUTS:
        assert_parity(load_audio(path, start=start, end=end), upstream_slice(path, start, end))


def _ffmpeg_refused(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("this file is read in-process; ffmpeg must not run")


@pytest.mark.parametrize(
    "suffix, subtype",
    [(".wav", "PCM_16"), (".wav", "PCM_24"), (".wav", "PCM_32"), (".wav", "FLOAT"), (".wav", "DOUBLE"),
     (".flac", "PCM_16"), (".flac", "PCM_24"), (".aiff", "PCM_16")],
)  # fmt: skip
def test_in_process_reading_equals_ffmpeg_for_every_sample_format_it_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, subtype: str
) -> None:
    # Noise up to 1.2x full scale (clipped by the conversion), plus exact half-step values (ties round to even),
    # longer than one read block so a cut crosses a block boundary.
    rng = np.random.default_rng(0)
    signal = np.clip(0.4 * rng.standard_normal(audio._BLOCK_FRAMES + SAMPLE_RATE), -1.2, 1.2)
    signal[::101] = (np.arange(signal[::101].size) % 9 - 4) * 0.5 * STEP
    path = tmp_path / f"{subtype}{suffix}"
    sf.write(path, signal, SAMPLE_RATE, subtype=subtype)
    theirs = upstream(path)
    monkeypatch.setattr(audio, "_decode_with_ffmpeg", _ffmpeg_refused)
    assert_parity(load_audio(path), theirs)
    start, end = (audio._BLOCK_FRAMES - 1000) / SAMPLE_RATE, (audio._BLOCK_FRAMES + 5000.4) / SAMPLE_RATE
    assert_parity(load_audio(path, start=start, end=end), upstream_slice(path, start, end))


@pytest.mark.parametrize(
    "rate, channels, subtype",
    [(16000, 2, "PCM_16"), (44100, 1, "PCM_16"), (48000, 2, "FLOAT"), (8000, 6, "PCM_16"), (22050, 1, "PCM_U8")],
)
def test_files_ffmpeg_mixes_or_resamples_decode_as_upstream(tmp_path: Path, rate: int, channels: int, subtype: str):
    rng = np.random.default_rng(1)
    path = tmp_path / f"{rate}-{channels}.wav"
    sf.write(path, 0.3 * rng.standard_normal((2 * rate, channels)), rate, subtype=subtype)
    assert_parity(load_audio(path), upstream(path))
    assert_parity(load_audio(path, start=0.7, end=1.3), upstream_slice(path, 0.7, 1.3))
