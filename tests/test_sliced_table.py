"""Sliced-table unpadded mode: an encoder with a sinusoid table encoding only a clip's frames, as whisper.cpp's
audio_ctx does; its margin; how checkpoints store it; the warnings when positions were never learned."""

import logging

import pytest
import torch
import torch.nn.functional as F
from whisper.model import Whisper

import whisper_rope
from whisper_rope.training.transplant import transplant_start_variant

from .conftest import randomise_, small_dims


def _pair(dims):
    upstream = randomise_(Whisper(dims)).eval()
    ours = whisper_rope.build_model(dims, "whisper").eval()
    ours.load_state_dict(upstream.state_dict())
    return upstream, ours


@torch.no_grad()
def _hand_sliced_encoder(upstream: Whisper, mel: torch.Tensor) -> torch.Tensor:
    """Upstream's encoder computation with its table cut to the input's positions (what whisper.cpp does)."""
    encoder = upstream.encoder
    x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel)))).permute(0, 2, 1)
    x = (x + encoder.positional_embedding[: x.shape[1]]).to(x.dtype)
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_post(x)


def test_sliced_table_equals_a_hand_sliced_upstream_forward(dims):
    upstream, ours = _pair(dims)
    mel, tokens = torch.randn(2, 80, 30), torch.randint(0, 50000, (2, 7))
    with pytest.raises(ValueError, match="needs exactly 48 frames"):
        ours(mel, tokens)
    ours.unpadded = True
    with torch.no_grad():
        audio = ours.encoder(mel)
        assert torch.equal(audio, _hand_sliced_encoder(upstream, mel))
        assert torch.equal(ours(mel, tokens), upstream.decoder(tokens, audio))
        # A whole window is not cut (no padding in random frames) and gets the whole table: upstream exactly.
        window = torch.randn(1, 80, 2 * dims.n_audio_ctx)
        assert torch.equal(ours.encoder(window), upstream.encoder(window))


def test_an_unpadded_window_drops_its_padding_and_keeps_the_margin(dims):
    upstream, ours = _pair(dims)
    speech = torch.randn(1, 80, 20)
    window = F.pad(speech, (0, 2 * dims.n_audio_ctx - 20), value=float(speech.min()) - 1)  # floor frames after it
    ours.unpadded = True
    with torch.no_grad():
        assert torch.equal(ours.encoder(window), _hand_sliced_encoder(upstream, speech))
        ours.unpadded_margin = 3
        kept = ours.encoder(window)
    assert kept.shape[1] == 10 + 3
    torch.testing.assert_close(kept, _hand_sliced_encoder(upstream, window[..., : 20 + 6]))
    with pytest.raises(ValueError, match="unpadded margin must be an integer in 0..24"):
        ours.unpadded_margin = 25


def test_a_sliced_table_refuses_more_positions_than_it_has(dims):
    model = whisper_rope.build_model(dims, "whisper")
    model.unpadded = True
    with pytest.raises(ValueError, match="slices a 24-position table and takes at most 48 frames"):
        model.encoder(torch.randn(1, 80, 50), torch.tensor([50]))


def test_the_transplant_hybrid_starts_as_the_sliced_model(dims):
    _, sliced = _pair(dims)
    hybrid = whisper_rope.build_model(dims, transplant_start_variant("rotary/learned"), gated_rotary=True).eval()
    hybrid.load_state_dict(sliced.state_dict(), strict=False)  # the gates stay at 0
    sliced.unpadded = hybrid.unpadded = True
    mel, tokens = torch.randn(2, 80, 30), torch.randint(0, 50000, (2, 5))
    with torch.no_grad():
        assert torch.equal(hybrid(mel, tokens), sliced(mel, tokens))


def test_checkpoints_keep_the_unpadded_setting_and_margin(tmp_path):
    model = whisper_rope.build_model(small_dims(), "whisper")
    model.unpadded, model.unpadded_margin = True, 4
    path = whisper_rope.save_checkpoint(model, tmp_path / "sliced.pt")
    loaded = whisper_rope.load_model(path, device="cpu")
    assert loaded.unpadded and loaded.unpadded_margin == 4 and loaded.rotary_options["unpadded_margin"] == 4
    padded = whisper_rope.load_model(path, device="cpu", unpadded=False, unpadded_margin=0)
    assert not padded.unpadded and padded.unpadded_margin == 0


def test_untrained_positions_are_named_in_one_warning(tmp_path, caplog):
    source = whisper_rope.save_checkpoint(whisper_rope.build_model(small_dims(), "whisper"), tmp_path / "w.pt")
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        whisper_rope.load_model(source, variant="rotary", device="cpu")
    [hard_swap] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "loaded as rotary/rotary" in hard_swap and "--recipe unpadded-rotary" in hard_swap
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        whisper_rope.load_model(source, device="cpu", unpadded=True)
    [sliced] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "not fine-tuned for unpadded input" in sliced and "--recipe unpadded-sliced" in sliced
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        whisper_rope.load_model(source, device="cpu")
        whisper_rope.load_model(source, variant=transplant_start_variant("rotary"), gated_rotary=True, device="cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # exact models: nothing to warn about
