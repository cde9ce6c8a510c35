"""The positional variants: upstream equivalence, kv-cache correctness, RoPE properties, encoder lengths."""

import contextlib
import logging

import pytest
import torch
import whisper
import whisper.decoding
from whisper.model import Whisper, disable_sdpa

import whisper_rope
from whisper_rope.audio import load_audio
from whisper_rope.features import trailing_padding_start
from whisper_rope.model import CausalSelfAttention, CrossAttention, ModelSettings, SelfAttention
from whisper_rope.positional import RotaryEmbedding, rotate_half

from .conftest import MIXED_VARIANTS, SPEECH_CLIPS, randomise_
from .speech_helpers import first_window, random_rotary

ALL_VARIANTS = whisper_rope.available_variants() + MIXED_VARIANTS


def _model(dims, variant):
    return randomise_(whisper_rope.build_model(dims, variant)).eval()


def _upstream_pair(dims):
    upstream = randomise_(Whisper(dims)).eval()
    ours = whisper_rope.build_model(dims, "whisper").eval()
    ours.load_state_dict(upstream.state_dict())
    return upstream, ours


def test_presets_and_canonical_names():
    assert whisper_rope.available_variants() == [
        "whisper",
        "rotary",
        "rotary/sinusoidal",
        "rotary/rotary+sinusoidal",
        "rotary/learned-sinusoidal",
    ]
    assert whisper_rope.parse_variant("whisper").name == "sinusoidal/learned"
    assert whisper_rope.parse_variant("sinusoidal+rotary/learned+rotary").name == "rotary+sinusoidal/rotary+learned"


@pytest.mark.parametrize("bad", ["rope", "rotary/", "learned/learned", "rotary/rotary+learned-sinusoidal", "a/b/c", ""])
def test_invalid_variant_lists_valid_schemes(bad):
    with pytest.raises(ValueError) as info:
        whisper_rope.parse_variant(bad)
    message = str(info.value)
    assert "valid encoder schemes: sinusoidal, rotary, rotary+sinusoidal" in message
    assert "learned-sinusoidal" in message


def test_whisper_variant_is_upstream_bit_for_bit(dims):
    upstream, ours = _upstream_pair(dims)
    assert list(ours.state_dict()) == list(upstream.state_dict())
    assert isinstance(ours, Whisper)
    mel = torch.randn(2, 80, 2 * dims.n_audio_ctx)
    tokens = torch.randint(0, 50000, (2, 12))
    for context in (contextlib.nullcontext, disable_sdpa):
        with context():
            assert torch.equal(ours(mel, tokens), upstream(mel, tokens))
    # Incremental decoding through upstream's cache hooks, one token at a time.
    for model_pair in [(upstream, ours)]:
        results = []
        for model in model_pair:
            cache, hooks = model.install_kv_cache_hooks()
            audio = model.embed_audio(mel)
            steps = [model.decoder(tokens[:, :5], audio, kv_cache=cache)]
            steps += [model.decoder(tokens[:, i : i + 1], audio, kv_cache=cache) for i in range(5, 12)]
            for hook in hooks:
                hook.remove()
            results.append(torch.cat(steps, dim=1))
        assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("beam_size", [None, 3])
def test_whisper_variant_decodes_upstream_tokens(dims, beam_size):
    upstream, ours = _upstream_pair(dims)
    # Upstream's beam search only works on one clip at a time (it does not repeat the audio features per beam).
    mel = torch.randn(2 if beam_size is None else 1, 80, 2 * dims.n_audio_ctx)
    options = whisper.DecodingOptions(language="en", beam_size=beam_size, sample_len=10, fp16=False)
    expected = [r.tokens for r in whisper.decode(upstream, mel, options)]
    assert [r.tokens for r in whisper.decode(ours, mel, options)] == expected
    assert all(len(tokens) > 0 for tokens in expected)


@contextlib.contextmanager
def _record_cache_errors(reference, errors):
    """Compare every cached decoding step of upstream's inference loop against a full forward pass.

    Upstream's `PyTorchInference.logits` sees the whole token history of every (rearranged) beam, so the last
    position's full-forward logits are the ground truth for the cached step. The full forward runs on a separate
    ``reference`` copy because upstream's cache hooks fire on every call of the decoding model's projections.
    """
    original = whisper.decoding.PyTorchInference.logits

    def checked(self, tokens, audio_features):
        cached = original(self, tokens, audio_features)
        with torch.no_grad():
            full = reference.decoder(tokens, audio_features)[:, -cached.shape[1] :]
        errors.append((cached - full).abs().max().item())
        return cached

    whisper.decoding.PyTorchInference.logits = checked
    try:
        yield
    finally:
        whisper.decoding.PyTorchInference.logits = original


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("beam_size", [None, 3])
def test_cached_decoding_matches_full_forward(dims, variant, beam_size):
    """Greedy and beam search (with cache rearrangement), batch of 2, fp32: every step equals a full forward."""
    model = _model(dims, variant)
    reference = whisper_rope.build_model(dims, variant).eval()
    reference.load_state_dict(model.state_dict())
    mel = torch.randn(2, 80, 2 * dims.n_audio_ctx)
    errors = []
    with _record_cache_errors(reference, errors):
        results = model.decode(
            mel, whisper.DecodingOptions(language="en", beam_size=beam_size, sample_len=12, fp16=False)
        )
    assert len(results) == 2 and len(errors) >= 10
    assert max(errors) < 1e-5, f"{variant}: max |cached - full| = {max(errors):.2e}"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_chunked_decoding_onto_cache_matches_full_forward(dims, variant):
    """Several tokens fed at once onto a non-empty cache (where upstream's own masking is wrong)."""
    model = _model(dims, variant)
    mel = torch.randn(2, 80, 2 * dims.n_audio_ctx)
    tokens = torch.randint(0, 50000, (2, 20))
    audio = model.embed_audio(mel)
    full = model.decoder(tokens, audio)
    for context in (contextlib.nullcontext, disable_sdpa):
        with context():
            cache, hooks = model.install_kv_cache_hooks()
            chunks = [
                model.decoder(tokens[:, a:b], audio, kv_cache=cache) for a, b in [(0, 4), (4, 5), (5, 11), (11, 20)]
            ]
            for hook in hooks:
                hook.remove()
            torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_batched_beam_search_equals_one_clip_at_a_time(dims):
    model = _model(dims, "rotary")
    mel = torch.randn(3, 80, 2 * dims.n_audio_ctx)
    options = whisper.DecodingOptions(language="en", beam_size=3, sample_len=8, fp16=False)
    batched = [r.tokens for r in model.decode(mel, options)]
    assert batched == [whisper.decode(model, mel[i], options).tokens for i in range(3)]
    greedy = whisper.DecodingOptions(language="en", sample_len=8, fp16=False)
    assert [r.tokens for r in model.decode(mel, greedy)] == [model.decode(mel[i], greedy).tokens for i in range(3)]


@pytest.mark.parametrize("variant", ["whisper", "rotary"])
def test_masked_cross_attention_of_one_clip_with_several_rows(dims, variant):
    """One clip, several decoding rows (beams), a key mask over its audio: each row attends as it would to the
    clip's real positions alone (the rows share the clip's one row of audio, as in a batch of several clips)."""
    model = _model(dims, variant)
    real = dims.n_audio_ctx // 2
    audio = torch.randn(1, dims.n_audio_ctx, dims.n_audio_state)
    mask = torch.zeros(1, dims.n_audio_ctx, dtype=torch.bool)
    mask[:, :real] = True
    tokens = torch.randint(0, 50000, (3, 4))
    with torch.no_grad():
        masked = model.decoder(tokens, audio, xa_mask=mask)
        alone = model.decoder(tokens, audio[:, :real].expand(3, -1, -1))
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)


def test_upstream_is_wrong_on_chunked_decoding(dims):
    """Documents why our attention aligns the causal mask: upstream mis-masks several tokens onto a cache."""
    upstream = randomise_(Whisper(dims)).eval()
    tokens = torch.randint(0, 50000, (1, 10))
    audio = upstream.embed_audio(torch.randn(1, 80, 2 * dims.n_audio_ctx))
    full = upstream.decoder(tokens, audio)
    cache, hooks = upstream.install_kv_cache_hooks()
    chunked = torch.cat(
        [
            upstream.decoder(tokens[:, :4], audio, kv_cache=cache),
            upstream.decoder(tokens[:, 4:], audio, kv_cache=cache),
        ],
        1,
    )
    assert (chunked - full).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_sdpa_and_explicit_attention_agree(dims, variant):
    model = _model(dims, variant)
    mel = torch.randn(2, 80, 2 * dims.n_audio_ctx)
    tokens = torch.randint(0, 50000, (2, 9))
    with_sdpa = model(mel, tokens)
    with disable_sdpa():
        explicit = model(mel, tokens)
    torch.testing.assert_close(with_sdpa, explicit, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(head_dim=16)
    q, k = torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)

    def scores(offset):
        rq, rk = rotary.rotate(q, offset), rotary.rotate(k, offset)
        return torch.einsum("bqhd,bkhd->bhqk", rq, rk)

    torch.testing.assert_close(scores(0), scores(123), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0), torch.einsum("bqhd,bkhd->bhqk", q, k), atol=1e-3)


def test_rope_rotates_every_head_and_keeps_norms():
    rotary = RotaryEmbedding(head_dim=8)
    x = torch.randn(1, 5, 4, 8)
    rotated = rotary.rotate(x)
    assert torch.equal(rotated[:, 0], x[:, 0])  # position 0 is the identity
    for head in range(4):
        assert not torch.allclose(rotated[:, 1:, head], x[:, 1:, head])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def test_rope_tables_are_cached_in_fp32_and_not_in_state_dict(dims):
    model = whisper_rope.build_model(dims, "rotary")
    assert not any("rotary" in key or "freqs" in key for key in model.state_dict())
    rotary = model.encoder.rotary
    assert all(block.attn.rotary is rotary for block in model.encoder.blocks)
    cos16, _ = rotary.tables(1500, torch.device("cpu"), torch.float16)
    cos32, _ = rotary.tables(1500, torch.device("cpu"), torch.float32)
    # Computed in fp32 then cast: position 1499 is exact, not rounded to a representable half-precision position.
    torch.testing.assert_close(cos16.float(), cos32.half().float())
    assert rotary.tables(10, torch.device("cpu"), torch.float32)[0].data_ptr() == cos32.data_ptr()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_cross_attention_is_never_rotated(dims, variant):
    model = whisper_rope.build_model(dims, variant)
    parsed = whisper_rope.parse_variant(variant)
    for block in model.decoder.blocks:
        assert block.cross_attn.rotary is None
        assert (block.attn.rotary is not None) == parsed.decoder.rotary
    for block in model.encoder.blocks:
        assert (block.attn.rotary is not None) == parsed.encoder.rotary


def test_table_free_encoder_accepts_any_length_and_table_encoder_names_shapes(dims):
    rotary = whisper_rope.build_model(dims, "rotary")
    for n_frames in (2, 10, 48, 100):
        assert rotary.encoder(torch.randn(1, 80, n_frames)).shape == (1, n_frames // 2, 64)
    with pytest.raises(ValueError, match=r"mel input has 10 frames .* needs exactly 48 frames"):
        whisper_rope.build_model(dims, "whisper").encoder(torch.randn(1, 80, 10))
    with pytest.raises(ValueError, match="needs exactly 48 frames"):
        whisper_rope.build_model(dims, "rotary+sinusoidal/learned").encoder(torch.randn(1, 80, 10))


def test_padded_batch_encodes_each_clip_as_if_alone(dims):
    """Unpadded training batches: padding frames leak neither into the encoder nor into cross-attention."""
    model = _model(dims, "rotary")
    lengths = [18, 40, 31]
    clips = [torch.randn(80, n) for n in lengths]
    batch = torch.zeros(3, 80, 40)
    for i, clip in enumerate(clips):
        batch[i, :, : clip.shape[1]] = clip
    n_frames = torch.tensor(lengths)
    encoded = model.encoder(batch, n_frames)
    tokens = torch.randint(0, 50000, (3, 6))
    logits = model(batch, tokens, n_frames)
    for i, clip in enumerate(clips):
        alone = model.encoder(clip[None])
        torch.testing.assert_close(encoded[i, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[i], model(clip[None], tokens[i : i + 1])[0], atol=1e-4, rtol=1e-5)


def test_unpadded_encoder_drops_transcribe_padding(dims):
    model = _model(dims, "rotary")
    audio = torch.randn(16000) * 0.1
    mel = whisper.log_mel_spectrogram(audio, padding=whisper.audio.N_SAMPLES)[:, :3000]
    n_real = trailing_padding_start(mel)
    assert 100 <= n_real <= 102  # 1 s of audio is 100 frames (+ the frame centred on the last sample)
    model.unpadded = True
    assert model.encoder(mel[None]).shape[1] == n_real // 2
    model.unpadded = False
    assert model.encoder(mel[None]).shape[1] == 1500
    sliced = _model(dims, "whisper")
    sliced.unpadded = True  # a table encoder slices its table instead (tests/test_sliced_table.py)
    assert sliced.encoder(mel[None][..., : 2 * dims.n_audio_ctx]).shape[1] == dims.n_audio_ctx


def test_settings_are_the_models_and_using_restores_them(dims):
    """One settings object, read by encoder and decoder; `using` changes it for a block only, even one that raises."""
    model = _model(dims, "rotary")
    mel = whisper.log_mel_spectrogram(torch.randn(16000) * 0.1, padding=whisper.audio.N_SAMPLES)[None, :, :3000]
    n_real = trailing_padding_start(mel[0])
    assert model.encoder.settings is model.settings is model.decoder.settings == ModelSettings()
    with model.using(unpadded=True, unpadded_margin=3) as same:
        assert same is model and model.encoder.settings is model.settings is model.decoder.settings
        assert model.encoder(mel).shape[1] == (n_real + 2 * 3 + 1) // 2  # 3 positions of padding: 6 frames
    assert model.settings == ModelSettings() and model.encoder(mel).shape[1] == 1500
    with pytest.raises(RuntimeError, match="inside"), model.using(unpadded=True):
        raise RuntimeError("inside")
    assert not model.unpadded and model.decoder.settings == ModelSettings()
    model.set_table_scales(decoder=0.25)
    model.set_table_scales(encoder=0.5)
    assert (model.encoder.table_scale, model.decoder.table_scale) == (0.5, 0.25)
    assert model.configure(unpadded=1).settings == ModelSettings(unpadded=True, table_scales=(0.5, 0.25))
    with pytest.raises(TypeError, match="drop_padding"):
        model.configure(drop_padding=True)
    with pytest.raises(ValueError, match=f"unpadded margin must be an integer in 0..{dims.n_audio_ctx}"):
        model.configure(unpadded_margin=dims.n_audio_ctx + 1)
    assert model.settings.unpadded_margin == 0  # a refused change changes nothing


def test_gated_rope_at_zero_is_the_unrotated_model(dims):
    hybrid = randomise_(whisper_rope.build_model(dims, "rotary+sinusoidal/rotary+learned", gated_rotary=True)).eval()
    plain = whisper_rope.build_model(dims, "whisper").eval()
    plain.load_state_dict({k: v for k, v in hybrid.state_dict().items() if "rotary_gate" not in k})
    mel = torch.randn(1, 80, 2 * dims.n_audio_ctx)
    tokens = torch.randint(0, 50000, (1, 8))
    torch.testing.assert_close(hybrid(mel, tokens), plain(mel, tokens), atol=1e-6, rtol=0)
    hybrid(mel, tokens).square().mean().backward()
    assert all(block.attn.rotary_gate.grad.abs().sum() > 0 for block in hybrid.decoder.blocks)


def test_attentions_subclass_upstream_under_upstreams_names(dims):
    assert all(issubclass(c, whisper.model.MultiHeadAttention) for c in (SelfAttention, CrossAttention))
    model = whisper_rope.build_model(dims, "rotary")
    assert all(type(block.attn) is SelfAttention for block in model.encoder.blocks)
    assert all(type(block.attn) is CausalSelfAttention for block in model.decoder.blocks)
    assert all(type(block.cross_attn) is CrossAttention for block in model.decoder.blocks)
    assert model.state_dict().keys() == whisper.model.Whisper(dims).state_dict().keys() - {
        "encoder.positional_embedding",
        "decoder.positional_embedding",
    }


def test_kv_cache_with_few_unpadded_frames_keeps_cross_attention_keys_and_matches_full_forward(monkeypatch):
    """Upstream's cache hook takes a projection with at most n_text_ctx (448) positions for self-attention and would
    concatenate it; unpadded audio of at most 8.96 s has that few. Harmless only while cross-attention keys are
    computed once per cache: every step here checks that, and that cached logits equal a full forward pass."""
    model = random_rotary(n_text_ctx=448)
    reference = whisper_rope.build_model(model.dims, "rotary").eval()
    reference.load_state_dict(model.state_dict())
    errors, cross_lengths = [], set()
    original = whisper.decoding.PyTorchInference.logits

    def checked(self, tokens, audio_features):
        cached = original(self, tokens, audio_features)
        for block in self.model.decoder.blocks:
            cross_lengths.add(self.kv_cache[block.cross_attn.key].shape[1])
            cross_lengths.add(self.kv_cache[block.cross_attn.value].shape[1])
        with torch.no_grad():
            full = reference.decoder(tokens, audio_features)[:, -cached.shape[1] :]
        errors.append((cached - full).abs().max().item())
        return cached

    monkeypatch.setattr(whisper.decoding.PyTorchInference, "logits", checked)
    window = first_window(load_audio(SPEECH_CLIPS[0]))
    result = model.decode(window, whisper.DecodingOptions(language="en", beam_size=3, sample_len=20, fp16=False))
    n_audio = result.audio_features.shape[0]
    assert n_audio <= 448 and cross_lengths == {n_audio}
    assert len(errors) >= 10 and max(errors) < 1e-5


def _load_rotary_checkpoint(tmp_path, trained_unpadded, caplog, **load_options):
    model = random_rotary()
    model.unpadded = trained_unpadded
    path = whisper_rope.save_checkpoint(model, tmp_path / f"rotary_{trained_unpadded}.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        loaded = whisper_rope.load_model(path, device="cpu", **load_options)
    return loaded, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_unpadded_option_is_stored_and_warns_for_checkpoints_not_trained_unpadded(tmp_path, caplog):
    loaded, warnings = _load_rotary_checkpoint(tmp_path, True, caplog)
    assert loaded.unpadded and loaded.rotary_options["unpadded"] and not warnings
    loaded, warnings = _load_rotary_checkpoint(tmp_path, False, caplog)
    assert not loaded.unpadded and not warnings
    loaded, warnings = _load_rotary_checkpoint(tmp_path, False, caplog, unpadded=True)
    assert loaded.unpadded
    assert len(warnings) == 1 and "was not fine-tuned for unpadded input" in warnings[0]
