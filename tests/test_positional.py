"""The fast RoPE form: the rotation itself, its gradients, tables computed once."""

import pytest
import torch
import whisper
import whisper.decoding

import whisper_rope
from whisper_rope import positional
from whisper_rope.positional import RotaryEmbedding, apply_rotary, rotate_half

from .conftest import small_dims
from .speech_helpers import random_rotary


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 5e-3)])
def test_apply_rotary_equals_the_textbook_rotation(dtype, atol):
    rotary = RotaryEmbedding(head_dim=64)
    x = torch.randn(2, 37, 6, 64).to(dtype)
    angles = positional.rotary_angles(torch.arange(5, 42), 64, 10000.0)
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    textbook = x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()
    torch.testing.assert_close(rotary.rotate(x, offset=5).float(), textbook, atol=atol, rtol=0)


@pytest.mark.parametrize("theta", [1.0, 0.5, float("nan"), float("inf"), 1e10])
def test_a_rotary_model_is_never_built_with_a_base_outside_the_declared_range(theta):
    """The library's own guard below `LoadOptions`/`FinetuneConfig` (whose fields declare the same `ROTARY_THETA`):
    `build_model` and `WhisperRope` take no `rotary_theta` whose tables would be NaN, constant or overflow."""
    with pytest.raises(ValueError, match=r"rotary theta must be a finite number > 1 and <= 1000000000, got"):
        whisper_rope.build_model(small_dims(), "rotary", rotary_theta=theta)


def test_apply_rotary_keeps_gradients():
    cos, sin = RotaryEmbedding(head_dim=8).tables(5, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 5, 2, 8, requires_grad=True)
    rotated = apply_rotary(x, cos[:, None], sin[:, None])
    with torch.no_grad():
        torch.testing.assert_close(rotated, apply_rotary(x, cos[:, None], sin[:, None]))
    rotated.square().sum().backward()
    # A rotation keeps norms, so d/dx |R x|^2 = 2 x.
    torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-5, rtol=1e-5)


def test_rope_tables_are_computed_once_for_all_layers_steps_and_calls(monkeypatch):
    model = random_rotary(n_text_ctx=448)
    model.unpadded = False
    calls = []
    original = positional.rotary_angles
    monkeypatch.setattr(positional, "rotary_angles", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    mel = torch.randn(2, 80, 3000)
    options = whisper.DecodingOptions(language="en", sample_len=6, fp16=False, beam_size=2)
    model.decode(mel, options)
    model.decode(mel, options)
    assert calls == [1500, 448]  # one table per side, for its whole context, reused by every later step and call
