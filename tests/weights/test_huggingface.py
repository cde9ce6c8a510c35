"""Hugging Face importer/exporter and the ``convert`` helper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import whisper
from safetensors.torch import load_file, save_file

try:  # importable as tests.convert_helpers when tests/ is a package, as convert_helpers when it is not
    from tests.convert_helpers import SMALL_DIMS, random_state_dict, write_model
except ImportError:
    from convert_helpers import SMALL_DIMS, random_state_dict, write_model
from whisper_rope.errors import CheckpointError, ModelNotFoundError
from whisper_rope.weights.convert import convert
from whisper_rope.weights.huggingface import (
    dims_to_config,
    hf_name,
    is_huggingface_dir,
    read_huggingface,
    special_tokens,
    write_huggingface,
)

HEADS = torch.tensor([[False, False], [True, False]])


def _write(tmp_path: Path, dtype: torch.dtype = torch.float32, dims=SMALL_DIMS) -> tuple:
    sd = {k: v.to(dtype) for k, v in random_state_dict(dims, seed=1).items()}
    out = write_huggingface(dims, sd, tmp_path / "hf", alignment_heads=HEADS)
    return sd, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_identity(tmp_path: Path, dtype: torch.dtype) -> None:
    sd, out = _write(tmp_path, dtype)
    assert is_huggingface_dir(out)
    imported = read_huggingface(out, dtype=None)
    assert imported.dims == SMALL_DIMS
    assert set(imported.state_dict) == set(sd)
    for name, tensor in sd.items():
        assert imported.state_dict[name].dtype == dtype
        assert torch.equal(imported.state_dict[name], tensor), name
    assert torch.equal(imported.alignment_heads, HEADS)
    assert read_huggingface(out).state_dict["encoder.conv1.weight"].dtype == torch.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_written_names_and_config(tmp_path: Path) -> None:
    _, out = _write(tmp_path)
    names = set(load_file(str(out / "model.safetensors")))
    assert "model.encoder.layers.1.self_attn.q_proj.weight" in names
    assert "model.encoder.layers.1.self_attn.k_proj.weight" in names
    assert "model.encoder.layers.1.self_attn.k_proj.bias" not in names
    assert "model.decoder.layers.0.encoder_attn_layer_norm.weight" in names
    assert "model.decoder.layers.0.fc2.bias" in names
    assert "model.decoder.embed_positions.weight" in names and "model.encoder.embed_positions.weight" in names
    assert "model.encoder.layer_norm.bias" in names and "model.decoder.layer_norm.weight" in names
    assert "proj_out.weight" not in names  # tied to model.decoder.embed_tokens.weight
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["d_model"] == 16 and config["encoder_ffn_dim"] == 64
    assert config["vocab_size"] == 100 and config["num_mel_bins"] == 8 and config["max_target_positions"] == 10
    assert config["alignment_heads"] == [[1, 0]]
    assert json.loads((out / "generation_config.json").read_text())["alignment_heads"] == [[1, 0]]


def test_hf_names() -> None:
    assert hf_name("encoder.blocks.3.mlp.0.weight") == "model.encoder.layers.3.fc1.weight"
    assert hf_name("decoder.blocks.0.cross_attn.value.bias") == "model.decoder.layers.0.encoder_attn.v_proj.bias"
    assert hf_name("decoder.blocks.0.cross_attn_ln.bias") == "model.decoder.layers.0.encoder_attn_layer_norm.bias"
    assert hf_name("decoder.blocks.2.attn.out.weight") == "model.decoder.layers.2.self_attn.out_proj.weight"
    assert hf_name("encoder.ln_post.weight") == "model.encoder.layer_norm.weight"
    assert hf_name("decoder.token_embedding.weight") == "model.decoder.embed_tokens.weight"


@pytest.mark.parametrize("multilingual", [False, True])
def test_special_token_ids_match_whisper_tokenizer(multilingual: bool) -> None:
    n_vocab = 51865 if multilingual else 51864
    tokenizer = whisper.tokenizer.get_tokenizer(multilingual, num_languages=99)
    assert special_tokens(n_vocab) == {"eot": tokenizer.eot, "sot": tokenizer.sot}
    config = dims_to_config({**SMALL_DIMS, "n_vocab": n_vocab}, torch.float16, None)
    assert config["decoder_start_token_id"] == tokenizer.sot and config["eos_token_id"] == tokenizer.eot


def test_pytorch_bin_with_tied_output_and_bare_prefix(tmp_path: Path) -> None:
    sd, out = _write(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"].clone()
    torch.save(tensors, out / "pytorch_model.bin")
    assert is_huggingface_dir(out)
    imported = read_huggingface(out)
    assert all(torch.equal(imported.state_dict[k], v) for k, v in sd.items())
    tensors["proj_out.weight"] += 1
    torch.save(tensors, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="proj_out.weight differs"):
        read_huggingface(out)
    # A bare WhisperModel (no "model." prefix) reads the same.
    bare = {k.removeprefix("model."): v for k, v in tensors.items() if k != "proj_out.weight"}
    (out / "pytorch_model.bin").unlink()
    save_file(bare, str(out / "model.safetensors"))
    assert torch.equal(read_huggingface(out).state_dict["decoder.ln.bias"], sd["decoder.ln.bias"])


def test_sharded_safetensors(tmp_path: Path) -> None:
    sd, out = _write(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    imported = read_huggingface(out)
    assert all(torch.equal(imported.state_dict[k], v) for k, v in sd.items())


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    _, out = _write(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    save_file({**tensors, "model.encoder.extra.weight": torch.ones(2)}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.encoder.extra.weight"):
        read_huggingface(out)
    del tensors["model.decoder.layers.1.fc1.bias"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.decoder.layers.1.fc1.bias"):
        read_huggingface(out)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_huggingface(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert not is_huggingface_dir(out)
    with pytest.raises(CheckpointError, match="model_type"):
        read_huggingface(out)
    with pytest.raises(ModelNotFoundError):
        read_huggingface(tmp_path / "missing")


def test_write_refuses_existing_output_unless_overwrite(tmp_path: Path) -> None:
    sd, out = _write(tmp_path)
    with pytest.raises(CheckpointError, match="already exists"):
        write_huggingface(SMALL_DIMS, sd, out)
    sd2 = {k: v + 1 for k, v in sd.items()}
    write_huggingface(SMALL_DIMS, sd2, out, overwrite=True)
    assert torch.equal(read_huggingface(out).state_dict["decoder.ln.bias"], sd2["decoder.ln.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(CheckpointError, match="rotary|upstream Whisper does not have"):
        write_huggingface(SMALL_DIMS, {**sd, "decoder.rotary.inv_freq": torch.ones(4)}, tmp_path / "x")
    with pytest.raises(CheckpointError, match="one width"):
        dims = {**SMALL_DIMS, "n_text_state": 32}
        write_huggingface(dims, random_state_dict(dims), tmp_path / "y")


# ---------------------------------------------------------------------------------------------------------------
# convert()


def test_convert_ctranslate2_to_pt_loads_in_upstream_whisper(tmp_path: Path) -> None:
    sd, _, _ = write_model(tmp_path / "ct2", mode="float16")
    out = convert(tmp_path / "ct2", tmp_path / "model.pt", progress=False)
    model = whisper.load_model(str(out), device="cpu")
    assert model.dims.n_vocab == SMALL_DIMS["n_vocab"]
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["model_state_dict"]["encoder.conv1.weight"].dtype == torch.float16
    assert checkpoint["alignment_heads"].dtype == torch.bool
    with pytest.raises(CheckpointError, match="already exists"):
        convert(tmp_path / "ct2", out, progress=False)
    convert(tmp_path / "ct2", out, progress=False, overwrite=True)


def test_convert_pt_to_hf_and_back(tmp_path: Path) -> None:
    sd = random_state_dict(SMALL_DIMS, seed=2)
    pt = tmp_path / "ours.pt"
    torch.save({"dims": SMALL_DIMS, "model_state_dict": sd, "variant": "whisper", "alignment_heads": HEADS}, pt)
    hf = convert(pt, tmp_path / "hf")
    back = convert(hf, tmp_path / "back.pt")
    checkpoint = torch.load(back, weights_only=True)
    assert checkpoint["dims"] == SMALL_DIMS
    assert all(torch.equal(checkpoint["model_state_dict"][k], v) for k, v in sd.items())
    assert torch.equal(checkpoint["alignment_heads"], HEADS)


def test_an_unpadded_model_keeps_its_setting_through_hugging_face_and_back(tmp_path: Path) -> None:
    from whisper_rope import build_model, load_model, save_checkpoint

    model = build_model(whisper.model.ModelDimensions(**SMALL_DIMS), "whisper")
    model.configure(unpadded=True, unpadded_margin=3, eot_penalty=1.5)  # as `finetune --recipe unpadded-sliced`
    pt = save_checkpoint(model, tmp_path / "sliced.pt")
    hf = convert(pt, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["whisper_rope"] == {"unpadded": True, "unpadded_margin": 3, "eot_penalty": 1.5}
    exported = load_model(hf, device="cpu")
    assert (exported.unpadded, exported.unpadded_margin, exported.eot_penalty) == (True, 3, 1.5)
    back = load_model(convert(hf, tmp_path / "back.pt"), device="cpu")
    assert (back.unpadded, back.unpadded_margin, back.eot_penalty) == (True, 3, 1.5)
    assert whisper.load_model(tmp_path / "back.pt", device="cpu").dims == exported.dims  # still upstream's file
    # A padded model's export carries no such key: upstream's config, as before.
    model.configure(unpadded=False, unpadded_margin=0, eot_penalty=0.0)
    plain = convert(save_checkpoint(model, tmp_path / "plain.pt"), tmp_path / "plain-hf")
    assert "whisper_rope" not in json.loads((plain / "config.json").read_text())
    assert load_model(plain, device="cpu").unpadded is False


@pytest.mark.parametrize("value", [{"unpadded": "yes"}, {"rotary_theta": 5.0}, [True], {"eot_penalty": -1}])
def test_a_config_with_a_bad_whisper_rope_entry_is_refused_naming_it(tmp_path: Path, value) -> None:
    _, out = _write(tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "whisper_rope": value}))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        read_huggingface(out)


@pytest.mark.parametrize("variant", ["whisper", "sinusoidal/learned"])
def test_convert_accepts_the_upstream_variant(tmp_path: Path, variant: str) -> None:
    pt = tmp_path / "ours.pt"
    rotary = {"theta": 10000.0, "gated": False, "unpadded": False}
    torch.save(
        {"dims": SMALL_DIMS, "model_state_dict": random_state_dict(SMALL_DIMS), "variant": variant, "rotary": rotary},
        pt,
    )
    assert is_huggingface_dir(convert(pt, tmp_path / "hf"))


@pytest.mark.parametrize(
    "extra",
    [
        {"variant": "rotary"},
        {"variant": "rotary+sinusoidal/learned"},
        {"variant": "sinusoidal/rotary+learned"},
        {"rotary": {"theta": 10000.0}},
    ],
)
def test_convert_refuses_rotary_variants_for_hf(tmp_path: Path, extra: dict) -> None:
    pt = tmp_path / "rope.pt"
    torch.save({"dims": SMALL_DIMS, "model_state_dict": random_state_dict(SMALL_DIMS), **extra}, pt)
    with pytest.raises(CheckpointError, match="rotary variants cannot be represented in the Hugging Face format"):
        convert(pt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("variant", ["sinusoidal/sinusoidal", "no/such"])
def test_convert_refuses_other_variants_for_hf(tmp_path: Path, variant: str) -> None:
    pt = tmp_path / "other.pt"
    torch.save({"dims": SMALL_DIMS, "model_state_dict": random_state_dict(SMALL_DIMS), "variant": variant}, pt)
    with pytest.raises(CheckpointError, match="variant"):
        convert(pt, tmp_path / "hf")


def test_convert_bad_sources_and_destinations(tmp_path: Path) -> None:
    write_model(tmp_path / "ct2")
    with pytest.raises(CheckpointError, match="must end in .pt"):
        convert(tmp_path / "ct2", tmp_path / "out_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        convert(tmp_path / "empty", tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        convert(tmp_path / "junk.pt", tmp_path / "hf")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a Whisper checkpoint: expected a dict with .dims."):
        convert(tmp_path / "other.pt", tmp_path / "hf")
    with pytest.raises(ModelNotFoundError):
        convert(tmp_path / "missing.pt", tmp_path / "hf")


def test_transformers_loads_the_export(tmp_path: Path) -> None:
    """Optional: only where transformers happens to be installed (whisper_rope itself never imports it)."""
    import transformers  # the test extra installs it

    sd, out = _write(tmp_path)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(out))
    model.eval()
    upstream = whisper.model.Whisper(whisper.model.ModelDimensions(**SMALL_DIMS))
    upstream.load_state_dict(sd)
    upstream.eval()
    mel = torch.randn(1, SMALL_DIMS["n_mels"], 2 * SMALL_DIMS["n_audio_ctx"])
    tokens = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = upstream(mel, tokens)
        got = model(input_features=mel, decoder_input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # And the reverse: what transformers saves, read_huggingface reads.
    model.save_pretrained(str(tmp_path / "saved"))
    again = read_huggingface(tmp_path / "saved")
    assert all(torch.equal(again.state_dict[k], v) for k, v in sd.items())
