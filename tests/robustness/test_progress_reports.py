"""Progress as people expect it: ``--no-progress`` silences every bar, and a long phase without a
bar (the teacher's targets with ``--no-progress`` or stderr not a terminal) logs what is done and what is left at
least every minute."""

import json
import logging

import pytest
import torch

import whisper_rope
from whisper_rope import progress as progress_module
from whisper_rope.data import load_examples
from whisper_rope.progress import LOG_INTERVAL_S, PhaseProgress
from whisper_rope.training.teacher_cache import TargetSpec, TeacherCache

from ..conftest import randomise_, small_dims
from . import SPEECH, run_cli


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No converted model in whisper_rope's cache and no upstream download cache: tiny.en is converted from the
    installed package on first use."""
    monkeypatch.setenv("WHISPER_ROPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.mark.parametrize("compute_type", ["auto", "float32"])  # the int8 load (auto on the CPU) looks up its cache
def test_no_progress_silences_the_bar_of_converting_the_installed_model(tmp_path, empty_caches, capfd, compute_type):
    manifest = tmp_path / "one.jsonl"
    row = json.loads((SPEECH / "manifest.jsonl").read_text().splitlines()[0])
    manifest.write_text(json.dumps({**row, "audio": str(SPEECH / row["audio"])}) + "\n")
    options = ["--device", "cpu", "--compute_type", compute_type, "--no-progress"]
    assert run_cli("evaluate", "--model", "tiny.en", "--data", manifest, *options) == 0
    err = capfd.readouterr().err
    assert "Importing CTranslate2" not in err and "it/s" not in err and "%|" not in err, err


def test_the_conversion_bar_shows_by_default(empty_caches, capfd):
    """The other half of the test above: the bar it looks for does appear when progress is on."""
    whisper_rope.load_model("tiny.en", device="cpu")
    assert "Importing CTranslate2 model" in capfd.readouterr().err


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_without_a_bar_logs_what_is_done_and_left_at_least_every_minute(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="whisper_rope"):
        phase = PhaseProgress(40, "teacher targets", "clip", bar=False, clock=clock)
        logged_at = [0.0]
        for _ in range(40):
            clock.now += 25.0  # 25 s per clip: a 1000-s phase
            count = len(caplog.records)
            phase.update()
            if len(caplog.records) > count:
                logged_at.append(clock.now)
        phase.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "teacher targets: 40 clips to go"
    assert lines[1] == "teacher targets: 3 of 40 clips (8 %), about 15 min left"  # 75 s for 3: 925 s for 37
    assert all(later - earlier <= LOG_INTERVAL_S + 25.0 for earlier, later in zip(logged_at, logged_at[1:]))
    assert 1000 - logged_at[-1] <= LOG_INTERVAL_S + 25.0 and len(lines) == 14


@pytest.mark.parametrize("progress", [False, True])  # True: pytest's stderr is not a terminal, so no bar either
def test_teacher_targets_without_a_bar_report_in_the_log(tmp_path, monkeypatch, caplog, capfd, progress):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # every clip: the minute is the test above
    teacher = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05).eval()
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()][:3]
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio": str(SPEECH / r["audio"])}) + "\n" for r in rows))
    dataset = load_examples(manifest, teacher, pad_30s=False, teacher_30s=True)
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec())
    with caplog.at_level(logging.INFO, logger="whisper_rope"):
        cache.fill(dataset, torch.device("cpu"), batch_size=1, progress=progress)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher targets")]
    assert lines[0] == "teacher targets: 3 clips to go"
    assert lines[1].startswith("teacher targets: 1 of 3 clips (33 %), about ") and lines[1].endswith(" left")
    assert lines[2].startswith("teacher targets: 2 of 3 clips (67 %), about ") and lines[2].endswith(" left")
    assert lines[3].startswith("teacher targets: 3 of 3 clips computed")
    assert "%|" not in capfd.readouterr().err  # no bar


class _FakeDownload:
    """What ``urllib.request.urlopen`` returns, holding a few bytes (which fail upstream's checksum afterwards)."""

    def __init__(self, *_):
        self.left = [b"x" * 100_000]

    def info(self):
        return {"Content-Length": "100000"}

    def read(self, _size):
        return self.left.pop() if self.left else b""

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


@pytest.mark.parametrize("progress", [False, True])
def test_no_progress_also_silences_upstreams_download_bar(tmp_path, monkeypatch, capfd, progress):
    monkeypatch.setattr("urllib.request.urlopen", _FakeDownload)
    monkeypatch.setattr("whisper_rope.weights.packages.find_installed_model", lambda name: None)
    with pytest.raises(RuntimeError, match="SHA256"):  # the fake bytes are not the model: only the bar matters
        whisper_rope.load_model("base.en", device="cpu", download_root=str(tmp_path), progress=progress)
    err = capfd.readouterr().err
    assert ("iB/s" in err or "98k" in err or "%|" in err) == progress, err
