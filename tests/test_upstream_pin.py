"""docs/design.md invariant 8: whisper_rope subclasses openai-whisper's internals, so the release is pinned and every
upstream name we rely on is asserted here; an upgrade fails loudly instead of silently changing numerics."""

import dataclasses
import inspect

import whisper
import whisper.decoding
import whisper.model
import whisper.timing


def test_pinned_release():
    assert whisper.__version__ == "20250625"


def test_upstream_names_we_rely_on():
    model = whisper.model
    for name in (
        "Whisper",
        "AudioEncoder",
        "TextDecoder",
        "ResidualAttentionBlock",
        "MultiHeadAttention",
        "ModelDimensions",
        "sinusoids",
        "disable_sdpa",
        "SDPA_AVAILABLE",
    ):
        assert hasattr(model, name), name
    assert [f.name for f in dataclasses.fields(model.ModelDimensions)] == [
        "n_mels",
        "n_audio_ctx",
        "n_audio_state",
        "n_audio_head",
        "n_audio_layer",
        "n_vocab",
        "n_text_ctx",
        "n_text_state",
        "n_text_head",
        "n_text_layer",
    ]
    assert list(inspect.signature(model.MultiHeadAttention.qkv_attention).parameters) == ["self", "q", "k", "v", "mask"]
    assert model.MultiHeadAttention.use_sdpa is True
    assert list(inspect.signature(model.ResidualAttentionBlock.forward).parameters) == [
        "self",
        "x",
        "xa",
        "mask",
        "kv_cache",
    ]
    assert list(inspect.signature(model.TextDecoder.forward).parameters) == ["self", "x", "xa", "kv_cache"]
    for name in ("_MODELS", "_ALIGNMENT_HEADS", "_download", "available_models", "load_model"):
        assert hasattr(whisper, name), name
    assert hasattr(whisper.decoding.PyTorchInference, "rearrange_kv_cache")
    # `whisper.transcribe` is the function (upstream re-exports it over the module's name).
    assert callable(whisper.transcribe) and callable(whisper.timing.find_alignment)
