"""Packed unpadded encoding: clips end to end with block-diagonal attention equal the masked padded batch, forward and
gradients, for every positional combination; the fused-kernel dispatch gets the layout right."""

import copy
from dataclasses import replace

import pytest
import torch

import whisper_rope
from whisper_rope import packing
from whisper_rope.packing import PackedClips, block_diagonal_attention

from .conftest import MIXED_VARIANTS, randomise_, small_dims

# Encoders that take input shorter than 30 s: rotary-only, or any encoder once its table has faded to 0.
ENCODER_SIDES = ["rotary", "rotary+sinusoidal", "sinusoidal"]
DECODER_SIDES = ["learned", "rotary", "sinusoidal", "rotary+learned"]


def test_layout_of_packed_clips():
    clips = PackedClips.from_lengths(torch.tensor([3, 1, 2]))
    assert clips.offsets.tolist() == [0, 3, 4, 6] and clips.offsets.dtype == torch.int32
    assert clips.positions.tolist() == [0, 1, 2, 0, 0, 1] and clips.max_length == 3 and clips.total == 6
    x = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    packed = clips.pack(x)
    assert packed.shape == (1, 6, 2)
    assert packed[0, :, 0].tolist() == [0, 2, 4, 8, 16, 18]
    unpacked = clips.unpack(packed, 4)
    real = torch.arange(4)[None, :] < torch.tensor([3, 1, 2])[:, None]
    assert torch.equal(unpacked[real], x[real]) and not unpacked[~real].any()
    with pytest.raises(ValueError, match="positive lengths"):
        PackedClips.from_lengths(torch.tensor([2, 0]))


def _model(variant, table_faded):
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=40), variant))
    if table_faded:
        model.set_table_scales(encoder=0.0)  # a transplanted encoder whose table has faded: it takes any length
    return model


@pytest.mark.parametrize("encoder", ENCODER_SIDES)
@pytest.mark.parametrize("decoder", DECODER_SIDES)
def test_packed_encoding_equals_the_masked_batch_forward_and_gradients(encoder, decoder):
    masked = _model(f"{encoder}/{decoder}", table_faded=encoder != "rotary")
    packed = copy.deepcopy(masked)
    n_frames = torch.tensor([80, 34, 58, 12])
    mel = torch.randn(4, 80, 80) * (torch.arange(80)[None, None, :] < n_frames[:, None, None])
    tokens = torch.randint(0, 50000, (4, 7))
    losses = []
    for model, use_packing in ((masked, False), (packed, True)):
        logits = model(mel, tokens, n_frames, packed=use_packing)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append((logits, loss))
    assert torch.allclose(losses[0][0], losses[1][0], atol=2e-5, rtol=1e-4)
    for (name, a), (_, b) in zip(masked.named_parameters(), packed.named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        assert torch.allclose(a.grad, b.grad, atol=2e-5, rtol=1e-3), name


@pytest.mark.parametrize("variant", ["rotary"] + MIXED_VARIANTS[:1])
def test_packed_audio_features_equal_each_clip_encoded_alone(variant):
    model = _model(variant, table_faded=True).eval()
    n_frames = torch.tensor([40, 18])
    mel = torch.randn(2, 80, 40) * (torch.arange(40)[None, None, :] < n_frames[:, None, None])
    with torch.no_grad():
        together = model.encoder(mel, n_frames, packed=True)
        alone = model.encoder(mel[1:, :, :18])
    assert torch.allclose(together[1, :9], alone[0], atol=1e-5)
    assert not together[1, 9:].any()  # padding positions come back as zeros


def test_gated_rotary_is_packed_with_its_gates():
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=40), "rotary", gated_rotary=True))
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.attn.rotary_gate.uniform_(0.2, 1.0)
    n_frames = torch.tensor([40, 22])
    mel = torch.randn(2, 80, 40)
    real = torch.arange(20)[None, :] < (n_frames[:, None] + 1) // 2
    with torch.no_grad():
        masked, packed = model.encoder(mel, n_frames), model.encoder(mel, n_frames, packed=True)
    assert torch.allclose(masked[real], packed[real], atol=1e-5)


def test_cuda_half_precision_takes_the_variable_length_kernel(monkeypatch):
    """On CUDA in fp16/bf16 the whole batch goes to ``varlen_attn`` with the clips' offsets (faked here on the CPU:
    no GPU in CI); other inputs take one unmasked SDPA call per clip."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((q.shape, cu_q.tolist(), cu_k.tolist(), max_q, max_k, cu_q.dtype))
        return q

    monkeypatch.setattr(packing, "varlen_kernel", lambda: fake_varlen)
    clips = PackedClips.from_lengths(torch.tensor([5, 3]))
    q = torch.randn(8, 2, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    block_diagonal_attention(q, q, q, clips)
    assert calls == [((8, 2, 4), [0, 5, 8], [0, 5, 8], 5, 5, torch.int32)]
    monkeypatch.undo()
    q = torch.randn(8, 2, 4)
    out = block_diagonal_attention(q, q, q, clips)
    first = torch.nn.functional.scaled_dot_product_attention(*(q[:5].transpose(0, 1),) * 3).transpose(0, 1)
    assert torch.allclose(out[:5], first, atol=1e-6) and len(calls) == 1


def test_finetune_with_packed_attention_trains_like_the_masked_batch(tmp_path, monkeypatch):
    import whisper_rope.model
    from tests.training.test_loop import ROWS, max_difference, quick_config, records, state_dict_of, write_manifest
    from whisper_rope.training.loop import finetune
    from whisper_rope.training.state import MODEL_FILE

    manifest = write_manifest(tmp_path / "four.jsonl", ROWS[:4])
    source = tmp_path / "source.pt"
    torch.manual_seed(0)
    whisper_rope.save_checkpoint(whisper_rope.build_model(small_dims(), "rotary"), source)
    calls = []
    kernel = whisper_rope.model.block_diagonal_attention
    monkeypatch.setattr(whisper_rope.model, "block_diagonal_attention", lambda *a: calls.append(1) or kernel(*a))
    losses, weights = [], []
    for packed in (False, True):
        out = tmp_path / ("packed" if packed else "masked")
        config = quick_config(out, model=str(source), train=str(manifest), steps=3, packed_attention=packed)
        finetune(config=replace(config, save_dtype="float32"))  # weights compared to 1e-4, below float16's step
        losses.append([r["loss"] for r in records(out, "train")])
        weights.append(state_dict_of(out / MODEL_FILE))
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert max_difference(weights[0], weights[1]) < 1e-4
    assert len(calls) >= 3 * 2  # the packed run went through the block-diagonal kernel (every step, every layer)
