"""Shared fixtures: small random-dimension models that use the real English tokenizer's vocabulary."""

from pathlib import Path

import pytest
import torch
from whisper.model import ModelDimensions

from whisper_rope.audio import load_audio

FIXTURES = Path(__file__).parent / "fixtures"
#: The speech fixture clips (2.2-3.5 s of TTS each), in name order.
SPEECH_CLIPS = sorted((FIXTURES / "speech").glob("*.flac"))

#: Variants exercised by the equivalence tests: every preset plus mixed combinations.
MIXED_VARIANTS = ["rotary+sinusoidal/learned", "sinusoidal/rotary+learned", "rotary/sinusoidal", "sinusoidal/rotary"]


def small_dims(n_audio_ctx: int = 24, n_text_ctx: int = 32) -> ModelDimensions:
    """Tiny dims with the English-only vocabulary, so upstream's tokenizer and decoding work unchanged."""
    return ModelDimensions(
        n_mels=80,
        n_audio_ctx=n_audio_ctx,
        n_audio_state=64,
        n_audio_head=4,
        n_audio_layer=2,
        n_vocab=51864,
        n_text_ctx=n_text_ctx,
        n_text_state=64,
        n_text_head=4,
        n_text_layer=2,
    )


@pytest.fixture
def dims() -> ModelDimensions:
    return small_dims()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter non-trivial random values (biases and norms too), so tests see every tensor."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("rotary_gate"):
                continue
            parameter.normal_(0, std)
            if "ln" in name and name.endswith("weight"):
                parameter.add_(1.0)
    return model


@pytest.fixture(scope="session")
def speech():
    """The fixture clips of tests/fixtures/speech as 16-kHz float arrays, in name order."""
    return [load_audio(path) for path in SPEECH_CLIPS]
