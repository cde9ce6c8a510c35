"""What the data tests share: the committed speech clips and a folder holding three of them."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import FIXTURES

SPEECH = FIXTURES / "speech"
ROWS = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    """tmp/audio/ holding three fixture clips; manifests go in tmp/ with paths relative to it."""
    (tmp_path / "audio").mkdir()
    for row in ROWS[:3]:
        shutil.copy(SPEECH / row["audio"], tmp_path / "audio" / row["audio"])
    return tmp_path


def write_file(path: Path, data: "str | bytes") -> Path:
    """``data`` (text as UTF-8) into ``path``; returns the path."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path
