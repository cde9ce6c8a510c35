"""Upstream's transcribe, decode and word timestamps run unchanged on every variant."""

import pytest
import torch

import whisper_rope
from whisper_rope.audio import load_audio

from .conftest import FIXTURES, randomise_, small_dims


@pytest.fixture(scope="module")
def hello_audio():
    return load_audio(FIXTURES / "hello.flac")


@pytest.mark.parametrize("variant", whisper_rope.available_variants())
def test_word_timestamps_run_for_every_preset(variant, hello_audio):
    torch.manual_seed(0)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), variant)).eval()
    result = model.transcribe(hello_audio, word_timestamps=True, fp16=False, temperature=0.0, language="en")
    words = [word for segment in result["segments"] for word in segment["words"]]
    assert words, "no words decoded"
    assert all(0.0 <= w["start"] <= w["end"] <= 30.0 for w in words)
