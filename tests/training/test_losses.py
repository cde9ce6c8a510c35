"""Internal-state distillation losses (whisper_rope.training.losses): recorded states, masks, zero at identity."""

import pytest
import torch

from whisper_rope import build_model
from whisper_rope.training.losses import (
    STATE_KINDS,
    StateRecorder,
    StateWeights,
    masked_mse,
    recorded_modules,
    stacked_states,
    state_terms,
)

from ..conftest import randomise_, small_dims

ALL = StateWeights(decoder_layers=1.0, encoder_output=1.0, encoder_layers=1.0, attention=1.0)


@torch.no_grad()
def _states(model, mel, tokens, n_frames=None):
    with StateRecorder(recorded_modules(model, STATE_KINDS)) as recorder:
        audio = model.encoder(mel, n_frames)
        model.decoder(tokens, audio)
    return stacked_states(recorder, audio)


def test_recorder_records_every_layer_and_removes_its_hooks():
    model = randomise_(build_model(small_dims(), "rotary")).eval()
    mel, tokens = torch.randn(2, 80, 30), torch.randint(0, 50000, (2, 7))
    states = _states(model, mel, tokens)
    assert states["decoder_layers"].shape == (3, 2, 7, 64)  # 2 blocks + the final layer norm
    assert states["encoder_layers"].shape == (2, 2, 15, 64)
    assert states["encoder_attention"].shape == (2, 2, 15, 64)
    assert states["decoder_attention"].shape == (2, 2, 7, 64)
    # The last decoder state is what the logits are made of.
    logits = states["decoder_layers"][-1] @ model.decoder.token_embedding.weight.T
    torch.testing.assert_close(logits, model(mel, tokens), rtol=1e-5, atol=1e-5)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0


@pytest.mark.parametrize("variant", ["whisper", "rotary", "rotary+sinusoidal/learned"])
def test_every_state_loss_is_zero_when_student_equals_teacher(variant):
    model = randomise_(build_model(small_dims(), variant)).eval()
    mel, tokens = torch.randn(2, 80, 48), torch.randint(0, 50000, (2, 6))
    student, teacher = _states(model, mel, tokens), _states(model, mel, tokens)
    token_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    terms = state_terms(student, teacher, ALL, token_mask, torch.tensor([24, 10]))
    assert set(terms) == set(STATE_KINDS)
    for total, count in terms.values():
        assert float(total) == 0.0 and float(count) > 0


def test_state_losses_grow_with_a_perturbed_student_and_compare_only_real_positions():
    teacher_model = randomise_(build_model(small_dims(), "rotary")).eval()
    student_model = randomise_(build_model(small_dims(), "rotary")).eval()
    mel, tokens = torch.randn(1, 80, 48), torch.randint(0, 50000, (1, 5))
    teacher = _states(teacher_model, mel, tokens)
    student = _states(student_model, mel, tokens)
    mask = torch.ones(1, 5, dtype=torch.bool)
    terms = state_terms(student, teacher, ALL, mask, torch.tensor([24]))
    assert all(float(total) > 0 for total, _ in terms.values())
    # Positions past the clip's count do not count: changing the teacher there changes nothing.
    shifted = {k: v.clone() for k, v in teacher.items()}
    shifted["encoder_output"][:, 10:] += 100.0
    before = state_terms(student, teacher, StateWeights(encoder_output=1.0), mask, torch.tensor([10]))
    after = state_terms(student, shifted, StateWeights(encoder_output=1.0), mask, torch.tensor([10]))
    assert float(before["encoder_output"][0]) == float(after["encoder_output"][0])
    assert float(before["encoder_output"][1]) == 10 * 64


def test_masked_mse_sums_squares_and_counts_compared_values():
    student = torch.zeros(2, 1, 3, 4)  # (layers, b, n, d)
    teacher = torch.ones(2, 1, 3, 4)
    total, count = masked_mse(student, teacher, torch.tensor([[True, True, False]]))
    assert float(total) == 2 * 2 * 4 and float(count) == 2 * 2 * 4
    with pytest.raises(ValueError, match="differ"):
        masked_mse(student, teacher[:, :, :2], torch.ones(1, 2, dtype=torch.bool))


def test_state_weights_refuse_negative_or_infinite_values():
    with pytest.raises(ValueError, match="decoder_layers"):
        StateWeights(decoder_layers=-1.0)
    with pytest.raises(ValueError, match="attention"):
        StateWeights(attention=float("inf"))
    assert StateWeights(decoder_layers=1.0, encoder_output=0.5).active == ("decoder_layers", "encoder_output")
