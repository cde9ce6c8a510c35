"""Loading pretrained weights into every variant, our checkpoint format, and refusing bad files."""

import os

import pytest
import torch
import whisper
from whisper.model import Whisper

import whisper_rope
from tests.conftest import randomise_
from whisper_rope.weights.format import read_checkpoint
from whisper_rope.weights.loading import adapt_state_dict

POSITIONAL = {"encoder.positional_embedding", "decoder.positional_embedding"}

# What loading an upstream checkpoint does with the positional tensors, per preset (docs/design.md, scheme table).
EXPECTED_REPORT = {
    "whisper": ({"encoder.positional_embedding", "decoder.positional_embedding"}, set(), set()),
    "rotary": (set(), {"encoder.positional_embedding", "decoder.positional_embedding"}, set()),
    "rotary/sinusoidal": (set(), {"encoder.positional_embedding", "decoder.positional_embedding"}, set()),
    "rotary/rotary+sinusoidal": (set(), {"encoder.positional_embedding", "decoder.positional_embedding"}, set()),
    "rotary/learned-sinusoidal": (
        set(),
        {"encoder.positional_embedding", "decoder.positional_embedding"},
        {"decoder.positional_embedding"},
    ),
    "rotary+sinusoidal/rotary+learned": (
        {"encoder.positional_embedding", "decoder.positional_embedding"},
        set(),
        set(),
    ),
}


@pytest.fixture
def upstream_file(tmp_path, dims):
    """An upstream-format checkpoint (what `whisper.load_model` reads) with random weights."""
    model = randomise_(Whisper(dims))
    path = tmp_path / "upstream.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path, model


@pytest.mark.parametrize("variant", list(EXPECTED_REPORT))
def test_loading_upstream_weights_follows_the_scheme_table(upstream_file, variant):
    path, source = upstream_file
    model = whisper_rope.load_model(path, variant=variant, device="cpu")
    assert isinstance(model, Whisper) and model.variant == whisper_rope.parse_variant(variant).name
    positional_loaded, dropped, initialised = EXPECTED_REPORT[variant]
    report = model.load_report
    assert set(report.dropped) == dropped
    assert set(report.initialised) == initialised
    assert set(report.loaded) & POSITIONAL == positional_loaded
    source_state, state = source.state_dict(), model.state_dict()
    for key in source_state.keys() - POSITIONAL:
        assert torch.equal(state[key], source_state[key]), key
    assert set(report.loaded) == (source_state.keys() - POSITIONAL) | positional_loaded


def test_mismatched_tensor_names_the_tensor_and_both_shapes(upstream_file, dims, tmp_path):
    path, source = upstream_file
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_state_dict"]["decoder.blocks.1.mlp.0.weight"] = torch.zeros(7, 64)
    bad = tmp_path / "bad.pt"
    torch.save(checkpoint, bad)
    with pytest.raises(
        ValueError, match=r"'decoder.blocks.1.mlp.0.weight' has shape \(7, 64\), the model's dims expect \(256, 64\)"
    ):
        whisper_rope.load_model(bad, device="cpu")
    del checkpoint["model_state_dict"]["decoder.blocks.1.mlp.0.weight"]
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match="lacks tensor 'decoder.blocks.1.mlp.0.weight'"):
        whisper_rope.load_model(bad, device="cpu")
    checkpoint["model_state_dict"]["decoder.blocks.1.mlp.0.weight"] = torch.zeros(256, 64)
    checkpoint["model_state_dict"]["decoder.extra.weight"] = torch.zeros(3)
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match="unexpected tensor 'decoder.extra.weight'"):
        whisper_rope.load_model(bad, device="cpu")


@pytest.mark.parametrize("variant", ["whisper", "rotary", "rotary/learned-sinusoidal", "rotary/rotary+sinusoidal"])
def test_save_load_round_trip_restores_variant_options_and_tensors(tmp_path, dims, variant):
    model = randomise_(whisper_rope.build_model(dims, variant, rotary_theta=5000.0))
    model.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"]) if dims.n_text_layer == 4 else None
    path = whisper_rope.save_checkpoint(model, tmp_path / "m.pt")
    assert not [p for p in os.listdir(tmp_path) if p != "m.pt"], "temporary files left behind"
    loaded = whisper_rope.load_model(path, device="cpu")
    assert loaded.variant == model.variant and loaded.rotary_theta == 5000.0
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert torch.equal(loaded.alignment_heads_dense(), model.alignment_heads_dense())
    assert loaded.load_report.dropped == [] and loaded.load_report.initialised == []
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"dims", "model_state_dict", "variant", "rotary", "alignment_heads", "whisper_rope_version"}
    assert raw["rotary"]["theta"] == 5000.0


def test_an_end_of_text_penalty_is_stored_restored_and_overridden_at_load(tmp_path, dims):
    model = whisper_rope.build_model(dims, "whisper").configure(unpadded=True, eot_penalty=1.5)
    path = whisper_rope.save_checkpoint(model, tmp_path / "m.pt")
    assert torch.load(path, weights_only=True)["rotary"]["eot_penalty"] == 1.5
    assert whisper_rope.load_model(path, device="cpu").eot_penalty == 1.5
    assert whisper_rope.load_model(path, device="cpu", eot_penalty=0).eot_penalty == 0.0
    plain = whisper_rope.save_checkpoint(whisper_rope.build_model(dims, "whisper"), tmp_path / "plain.pt")
    assert "eot_penalty" not in torch.load(plain, weights_only=True)["rotary"]  # older readers see what they knew
    assert whisper_rope.load_model(plain, device="cpu").eot_penalty == 0.0


def test_whisper_variant_file_loads_in_upstream(tmp_path, dims):
    model = randomise_(whisper_rope.build_model(dims, "whisper")).eval()
    path = whisper_rope.save_checkpoint(model, tmp_path / "w.pt")
    upstream = whisper.load_model(str(path), device="cpu")
    mel, tokens = torch.randn(1, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (1, 5))
    assert torch.equal(upstream(mel, tokens), model(mel, tokens))


def test_loading_with_another_variant_adapts_and_reports(tmp_path, dims):
    model = randomise_(whisper_rope.build_model(dims, "rotary/learned-sinusoidal"))
    path = whisper_rope.save_checkpoint(model, tmp_path / "ls.pt")
    same = whisper_rope.load_model(path, device="cpu")
    assert "decoder.positional_embedding" in same.load_report.loaded  # a fine-tuned learned-sinusoidal table is kept
    other = whisper_rope.load_model(path, variant="rotary", device="cpu")
    assert other.variant == "rotary/rotary" and other.load_report.dropped == ["decoder.positional_embedding"]
    back = whisper_rope.load_model(path, variant="whisper", device="cpu")
    assert set(back.load_report.initialised) == {"encoder.positional_embedding"}
    assert torch.equal(back.decoder.positional_embedding, model.decoder.positional_embedding)


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/whisper_rope_payload_marker", "w"))


def test_pickled_object_in_checkpoint_is_refused_without_running_it(tmp_path):
    marker = "/tmp/whisper_rope_payload_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing checkpoint .*evil.pt"):
        whisper_rope.load_model(path, device="cpu")
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "truncated or not a PyTorch file"),
        (b"not a checkpoint at all", "truncated or not a PyTorch file"),
    ],
)
def test_unreadable_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_checkpoint(path)


def test_truncated_checkpoint_and_wrong_layout(tmp_path, upstream_file):
    path, _ = upstream_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        whisper_rope.load_model(truncated, device="cpu")
    layout = tmp_path / "layout.pt"
    torch.save({"weights": torch.zeros(1)}, layout)
    with pytest.raises(ValueError, match="expected a dict with 'dims' and 'model_state_dict'"):
        whisper_rope.load_model(layout, device="cpu")


def test_unknown_model_name_lists_names():
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a model name; available names: tiny.en"):
        whisper_rope.load_model("tiny-but-wrong")


def test_adapt_state_dict_is_pure(dims):
    source = randomise_(Whisper(dims)).state_dict()
    target = whisper_rope.build_model(dims, "rotary")
    before = {k: v.clone() for k, v in source.items()}
    adapt_state_dict(source, "whisper", target)
    assert all(torch.equal(before[k], source[k]) for k in source)
