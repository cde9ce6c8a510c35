"""Fixtures of every training test."""

from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES


def audio_folder(tmp_path: Path) -> Path:
    """The speech fixtures as a folder of untranscribed audio (links, no .txt beside them): what a user gives
    ``--train`` for label-free training."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for clip in sorted((FIXTURES / "speech").glob("*.flac")):
        (folder / clip.name).symlink_to(clip)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared, busy CPU one thread is several times faster for these small models than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
