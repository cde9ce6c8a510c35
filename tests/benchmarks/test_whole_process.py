"""benchmarks/whole_process.py keeps working, and reads each child's own figures."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_whole_process_benchmark_runs_in_quick_mode(tmp_path):
    """One run of the int8 command and of the faster-whisper script on the 11-s recording: both transcripts read
    back (tiny.en gets all 22 words), and each peak RSS is the child's own (faster-whisper needs about half of what
    whisper-rope does; a figure inherited from the timing process would make them equal)."""
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "whole_process.py"), "--quick", "--work", str(tmp_path)]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {row["system"]: row for row in json.loads(out.read_text())}
    assert sorted(rows) == ["faster-whisper int8", "whisper-rope int8"]
    assert all(row["wer"] < 10 and row["cpu_s"] > 0.5 for row in rows.values()), rows
    assert rows["faster-whisper int8"]["rss_mb"] < 0.8 * rows["whisper-rope int8"]["rss_mb"], rows
    assert "| short | whisper-rope int8 |" in run.stdout
