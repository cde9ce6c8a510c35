"""Positional transplant: exact start, gradients at the gates, schedules, and the finished model."""

import pytest
import torch
from whisper.model import Whisper

import whisper_rope
from tests.conftest import randomise_
from whisper_rope.training.transplant import (
    TRANSPLANT_VARIANT,
    TransplantSchedule,
    apply_schedule,
    finalize_transplant,
    ramp,
    rotary_gates,
)


@pytest.fixture
def pretrained(dims):
    return randomise_(Whisper(dims)).eval()


def _transplant_model(dims, pretrained):
    model = whisper_rope.build_model(dims, TRANSPLANT_VARIANT, gated_rotary=True).eval()
    model.load_state_dict(
        {**pretrained.state_dict(), **{k: v for k, v in model.state_dict().items() if "rotary_gate" in k}}
    )
    return model


def test_gates_at_zero_compute_the_pretrained_function_full_and_cached(dims, pretrained):
    model = _transplant_model(dims, pretrained)
    mel, tokens = torch.randn(2, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (2, 10))
    assert (model(mel, tokens) - pretrained(mel, tokens)).abs().max() <= 1e-6
    audio = model.embed_audio(mel)
    assert (audio - pretrained.embed_audio(mel)).abs().max() <= 1e-6
    cache, hooks = model.install_kv_cache_hooks()
    cached = torch.cat(
        [model.decoder(tokens[:, :4], audio, kv_cache=cache)]
        + [model.decoder(tokens[:, i : i + 1], audio, kv_cache=cache) for i in range(4, 10)],
        dim=1,
    )
    for hook in hooks:
        hook.remove()
    assert (cached - pretrained(mel, tokens)).abs().max() <= 1e-5


def test_gradient_reaches_every_gate_at_zero(dims, pretrained):
    model = _transplant_model(dims, pretrained).train()
    model(torch.randn(1, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (1, 6))).logsumexp(-1).mean().backward()
    gates = list(rotary_gates(model))
    assert len(gates) == dims.n_audio_layer + dims.n_text_layer
    assert all(g.grad is not None and g.grad.abs().min() > 0 for g in gates)


def test_schedule_endpoints():
    schedule = TransplantSchedule(anneal_start=10, anneal_steps=100, shape="cosine", gate_start=0, gate_steps=50)
    assert schedule.table_scale(0) == 1.0 and schedule.table_scale(10) == 1.0
    assert schedule.table_scale(60) == pytest.approx(0.5) and schedule.table_scale(110) == 0.0
    assert schedule.gate_value(0) == 0.0 and schedule.gate_value(50) == 1.0 and schedule.gate_value(500) == 1.0
    assert ramp(5, 0, 10, "linear") == 0.5 and TransplantSchedule().gate_value(3) is None
    with pytest.raises(ValueError, match="shape"):
        TransplantSchedule(shape="square")


def test_alpha_one_is_the_pretrained_table_and_zero_removes_it(dims, pretrained):
    model = _transplant_model(dims, pretrained)
    mel, tokens = torch.randn(1, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (1, 5))
    reference = model(mel, tokens)
    apply_schedule(model, TransplantSchedule(anneal_steps=10), step=0)
    assert torch.equal(model(mel, tokens), reference)
    apply_schedule(model, TransplantSchedule(anneal_steps=10), step=10)
    assert model.encoder.table_scale == 0.0 and model.decoder.table_scale == 0.0
    untabled = whisper_rope.build_model(dims, "rotary/rotary", gated_rotary=True).eval()
    untabled.load_state_dict({k: v for k, v in model.state_dict().items() if "positional_embedding" not in k})
    torch.testing.assert_close(model(mel, tokens), untabled(mel, tokens), atol=1e-5, rtol=0)


def test_finished_transplant_saves_and_reloads_as_plain_rotary(dims, pretrained, tmp_path):
    model = randomise_(_transplant_model(dims, pretrained))
    with pytest.raises(ValueError, match="has not finished"):
        finalize_transplant(model)
    apply_schedule(model, TransplantSchedule(anneal_steps=1, gate_steps=1), step=1)
    plain, report = finalize_transplant(model)
    assert plain.variant == "rotary/rotary" and not plain.gated_rotary
    assert set(report.dropped) == {"encoder.positional_embedding", "decoder.positional_embedding"} | {
        k for k in model.state_dict() if k.endswith("rotary_gate")
    }
    path = whisper_rope.save_checkpoint(plain, tmp_path / "rotary.pt")
    reloaded = whisper_rope.load_model(path, device="cpu")
    mel, tokens = torch.randn(1, 80, 40), torch.randint(0, 50000, (1, 6))
    full_length_mel = torch.randn(1, 80, 2 * dims.n_audio_ctx)
    torch.testing.assert_close(reloaded(full_length_mel, tokens), model(full_length_mel, tokens), atol=1e-5, rtol=1e-5)
    assert reloaded(mel, tokens).shape == (1, 6, dims.n_vocab)  # table-free: any length


def test_mid_transplant_checkpoint_keeps_its_table_scales(dims, pretrained, tmp_path):
    model = _transplant_model(dims, pretrained)
    apply_schedule(model, TransplantSchedule(anneal_steps=10, sides="decoder"), step=5)
    path = whisper_rope.save_checkpoint(model, tmp_path / "mid.pt")
    reloaded = whisper_rope.load_model(path, device="cpu")
    assert reloaded.encoder.table_scale == 1.0 and reloaded.decoder.table_scale == pytest.approx(0.5)
    mel, tokens = torch.randn(1, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (1, 5))
    assert torch.equal(reloaded(mel, tokens), model(mel, tokens))


def _transplant_config(tmp_path, output, **overrides):
    """A short transplant of a random model on the committed clips; the source is saved once per test."""
    from tests.conftest import FIXTURES, small_dims
    from whisper_rope.training.config import FinetuneConfig

    source_path = tmp_path / "source.pt"
    if not source_path.exists():
        torch.manual_seed(0)
        whisper_rope.save_checkpoint(
            randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper")), source_path
        )
    settings = dict(
        model=str(source_path),
        train=str(FIXTURES / "speech" / "manifest.jsonl"),
        output=str(output),
        steps=5,
        batch_size=2,
        lr=1e-3,
        warmup_steps=0,
        num_workers=0,
        progress=False,
        transplant=True,
        log_every=1,
        transplant_anneal_steps=2,
        transplant_gate_steps=2,
        distill=True,
        device="cpu",
        threads=1,
    )
    settings.update(overrides)
    return FinetuneConfig(**settings)


def test_short_transplant_run_ends_as_plain_rotary(tmp_path):
    from whisper_rope.training.loop import finetune

    config = _transplant_config(tmp_path, tmp_path / "run", steps=4, transplant_anneal_steps=3, transplant_gate_steps=3)
    result = finetune(config=config)
    losses = [r["loss"] for r in result.history if r["event"] == "train"]
    assert losses and all(map(lambda x: x == x and x < 1e4, losses))
    assert [r["finished"] for r in result.history if r["event"] == "transplant"] == [True]
    saved = whisper_rope.load_model(result.model_path, device="cpu")
    assert saved.variant == "rotary/rotary" and not saved.gated_rotary
    assert result.model.variant == "rotary/rotary"


def test_faded_encoder_table_takes_any_length_like_the_finished_model(dims, pretrained):
    model = randomise_(_transplant_model(dims, pretrained))
    short_mel, tokens = torch.randn(2, 80, 40), torch.randint(0, 50000, (2, 6))
    with pytest.raises(ValueError, match="needs exactly"):
        model(short_mel, tokens)
    model.unpadded = True  # the table is sliced to the 20 positions, not yet faded: not the finished model
    plain_too_early = model(short_mel, tokens)
    apply_schedule(model, TransplantSchedule(anneal_steps=4, gate_steps=4), step=4)  # the table adds nothing any more
    assert not torch.allclose(plain_too_early, model(short_mel, tokens))
    plain, _ = finalize_transplant(model)
    torch.testing.assert_close(model(short_mel, tokens), plain(short_mel, tokens), atol=1e-5, rtol=1e-5)
    padded = torch.nn.functional.pad(short_mel, (0, 2 * dims.n_audio_ctx - 40))  # as transcribe feeds it
    assert model.embed_audio(padded).shape[1] == plain.embed_audio(short_mel).shape[1] == 20  # padding dropped


def test_checkpoint_of_the_unpadded_phase_reloads_unpadded(dims, pretrained, tmp_path):
    model = _transplant_model(dims, pretrained)
    apply_schedule(model, TransplantSchedule(anneal_steps=2), step=2)  # tables gone, gates still learning
    model.unpadded = True
    reloaded = whisper_rope.load_model(whisper_rope.save_checkpoint(model, tmp_path / "mid.pt"), device="cpu")
    assert reloaded.unpadded and reloaded.encoder.table_scale == 0.0 and reloaded.variant == TRANSPLANT_VARIANT
    mel, tokens = torch.randn(1, 80, 40), torch.randint(0, 50000, (1, 5))
    assert torch.equal(reloaded(mel, tokens), model(mel, tokens))


@pytest.mark.parametrize("targets", ["transcripts", "teacher transcripts"])
def test_transplant_continues_unpadded_once_the_tables_are_gone(tmp_path, targets):
    from whisper_rope.training.loop import finetune

    result = finetune(
        config=_transplant_config(
            tmp_path, tmp_path / "run", transplant_unpadded=True, distill_only=targets == "teacher transcripts"
        )
    )
    assert [(r["step"], r["unpadded"]) for r in result.history if r["event"] == "input"] == [(2, True)]
    assert result.history[0]["unpadded"] is False  # the start: 30-s windows while the tables fade
    losses = [r["loss"] for r in result.history if r["event"] == "train"]
    assert len(losses) == 5 and all(loss == loss and loss < 1e4 for loss in losses)
    saved = whisper_rope.load_model(result.model_path, device="cpu")
    assert saved.variant == "rotary/rotary" and saved.unpadded  # stored as trained unpadded
    assert result.model.unpadded


def test_resume_inside_the_unpadded_phase_repeats_the_uninterrupted_run(tmp_path):
    import shutil

    from whisper_rope.training.loop import finetune
    from whisper_rope.weights.format import read_checkpoint

    settings = dict(transplant_unpadded=True, save_every=3, keep_last=3)
    straight = finetune(config=_transplant_config(tmp_path, tmp_path / "straight", **settings))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "straight" / "step-0000003", interrupted / "step-0000003")
    resumed = finetune(config=_transplant_config(tmp_path, interrupted, resume=str(interrupted), **settings))
    assert resumed.steps == 5 and not [r for r in resumed.history if r["event"] == "input"]  # resumed unpadded
    expected = [r["loss"] for r in straight.history if r["event"] == "train"][3:]
    assert [r["loss"] for r in resumed.history if r["event"] == "train"] == pytest.approx(expected, abs=1e-6)
    a, b = (read_checkpoint(p)["model_state_dict"] for p in (straight.model_path, resumed.model_path))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_unpadded_transplant_needs_both_tables_to_fade():
    from whisper_rope.training.config import FinetuneConfig

    with pytest.raises(ValueError, match="--transplant-unpadded needs --transplant"):
        FinetuneConfig(
            train="x.jsonl", transplant=True, transplant_sides="decoder", transplant_unpadded=True
        ).validate()
    with pytest.raises(ValueError, match="--transplant-unpadded needs --transplant"):
        FinetuneConfig(train="x.jsonl", transplant_unpadded=True).validate()


def test_transplant_refuses_another_target_variant():
    from whisper_rope.training.config import FinetuneConfig

    with pytest.raises(ValueError, match="a transplant ends in rotary/rotary or rotary/learned"):
        FinetuneConfig(train="x.jsonl", transplant=True, variant="whisper").validate()
