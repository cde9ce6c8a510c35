"""benchmarks/transcribe_speed.py keeps working."""

import json
import subprocess
import sys
from pathlib import Path

import whisper_rope

from ..conftest import FIXTURES, small_dims

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_script_runs_in_quick_mode(tmp_path):
    """Keeps benchmarks/transcribe_speed.py working (its numbers are not checked)."""
    out = tmp_path / "results.json"
    script = ROOT / "benchmarks" / "transcribe_speed.py"
    finetuned = whisper_rope.save_checkpoint(whisper_rope.build_model(small_dims(), "rotary"), tmp_path / "ft.pt")
    chosen = [
        "openai-whisper",
        "whisper_rope whisper",
        "whisper_rope rotary unpadded, batch 8",
        "fine-tuned rotary",
        "fine-tuned rotary unpadded, batch 8",
        "faster-whisper int8",
    ]
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--json",
            str(out),
            "--finetuned",
            str(finetuned),
            "--clips",
            str(FIXTURES / "speech" / "manifest.jsonl"),
            "--systems",
            *chosen,
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {row["system"] for row in results["end_to_end"]} == set(chosen)
    assert [row["measure"] for row in results["rope_overhead"]][0] == "encoder forward"
    assert "| clips | decoding | system |" in run.stdout
