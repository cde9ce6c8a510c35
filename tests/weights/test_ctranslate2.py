"""CTranslate2 importer: round trips through synthetic model.bin files, and every corruption it must refuse."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from whisper.model import ModelDimensions, Whisper

try:  # importable as tests.convert_helpers when tests/ is a package, as convert_helpers when it is not
    from tests.convert_helpers import SMALL_DIMS, random_state_dict, serialise, whisper_spec_variables, write_model
except ImportError:
    from convert_helpers import SMALL_DIMS, random_state_dict, serialise, whisper_spec_variables, write_model
from whisper_rope.errors import CheckpointError, ModelNotFoundError
from whisper_rope.weights.ctranslate2 import is_ctranslate2_dir, read_ctranslate2
from whisper_rope.weights.format import upstream_shapes

FLOAT_MODES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _assert_loads_strictly(imported) -> None:
    model = Whisper(ModelDimensions(**imported.dims))
    model.load_state_dict(imported.state_dict, strict=True)


@pytest.mark.parametrize("mode", sorted(FLOAT_MODES))
def test_float_round_trip_is_exact_after_the_cast(tmp_path: Path, mode: str) -> None:
    sd, _, _ = write_model(tmp_path, mode=mode)
    imported = read_ctranslate2(tmp_path)
    assert imported.dims == SMALL_DIMS
    assert set(imported.state_dict) == set(sd)
    for name, expected in sd.items():
        got = imported.state_dict[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected.to(FLOAT_MODES[mode]).float(), rtol=0, atol=0, msg=name)
    _assert_loads_strictly(imported)


@pytest.mark.parametrize("mode", ["int8", "int8_float16", "int16"])
def test_quantised_round_trip_within_quantisation_error(tmp_path: Path, mode: str) -> None:
    sd, _, _ = write_model(tmp_path, mode=mode)
    imported = read_ctranslate2(tmp_path)
    for name, expected in sd.items():
        got = imported.state_dict[name]
        # int8 keeps 127 steps per row's max, int16 2**10 per tensor's max; half a step is the rounding error.
        steps = 2.0**10 if mode == "int16" else 127.0
        atol = float(expected.abs().max()) / steps / 2 * 1.001 + 1e-3  # + fp16 rounding of unquantised tensors
        torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=name)
    _assert_loads_strictly(imported)


def test_dtype_none_keeps_the_source_float_type(tmp_path: Path) -> None:
    write_model(tmp_path, mode="float16")
    imported = read_ctranslate2(tmp_path, dtype=None)
    assert {t.dtype for t in imported.state_dict.values()} == {torch.float16}
    write_model(tmp_path / "q", mode="int8")
    assert {t.dtype for t in read_ctranslate2(tmp_path / "q", dtype=None).state_dict.values()} == {torch.float32}


def test_fused_projections_are_split_in_order(tmp_path: Path) -> None:
    sd, _, _ = write_model(tmp_path)
    got = read_ctranslate2(tmp_path).state_dict
    for stack in ("encoder", "decoder"):
        for part in ("query", "key", "value"):
            assert torch.equal(got[f"{stack}.blocks.1.attn.{part}.weight"], sd[f"{stack}.blocks.1.attn.{part}.weight"])
    for part in ("key", "value"):
        name = f"decoder.blocks.0.cross_attn.{part}.weight"
        assert torch.equal(got[name], sd[name])
    assert "decoder.blocks.0.attn.key.bias" not in got
    assert torch.equal(got["decoder.blocks.0.cross_attn.value.bias"], sd["decoder.blocks.0.cross_attn.value.bias"])
    # Split tensors own their memory (no hidden views of a 3x larger buffer).
    query, key = got["encoder.blocks.0.attn.query.weight"], got["encoder.blocks.0.attn.key.weight"]
    assert query.untyped_storage().data_ptr() != key.untyped_storage().data_ptr()


def test_non_zero_key_bias_is_dropped(tmp_path: Path) -> None:
    sd = random_state_dict(SMALL_DIMS)
    variables = whisper_spec_variables(sd, SMALL_DIMS)
    variables["encoder/layer_0/self_attention/linear_0/bias"][16:32] = 5.0  # the key third
    data, _ = serialise(variables)
    (tmp_path / "model.bin").write_bytes(data)
    imported = read_ctranslate2(tmp_path / "model.bin")
    assert torch.equal(imported.state_dict["encoder.blocks.0.attn.value.bias"], sd["encoder.blocks.0.attn.value.bias"])


@pytest.mark.parametrize("split", [[3], [100], [1000, 1001, 5000], "halves"])
def test_split_parts_in_one_directory(tmp_path: Path, split) -> None:
    full = tmp_path / "full"
    write_model(full)
    size = (full / "model.bin").stat().st_size
    cuts = [size // 2] if split == "halves" else split
    sd, _, _ = write_model(tmp_path / "parts", split=cuts)
    imported = read_ctranslate2(tmp_path / "parts")
    assert all(torch.equal(imported.state_dict[k], v) for k, v in sd.items())
    assert "model.bin.part1 +" in imported.source


def test_parts_in_separate_directories(tmp_path: Path) -> None:
    sd, _, data = write_model(tmp_path / "a", split=[777])
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "model.bin.part2").rename(tmp_path / "b" / "model.bin.part2")
    parts = [tmp_path / "a" / "model.bin.part1", tmp_path / "b" / "model.bin.part2"]
    imported = read_ctranslate2(tmp_path / "a", parts=parts)
    assert all(torch.equal(imported.state_dict[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="part missing"):
        read_ctranslate2(tmp_path / "a")  # part2 is elsewhere: the file looks truncated
    with pytest.raises(CheckpointError):
        read_ctranslate2(tmp_path / "a", parts=list(reversed(parts)))


def test_projection_stored_without_alias(tmp_path: Path) -> None:
    sd, _, _ = write_model(tmp_path, alias_projection=False)
    imported = read_ctranslate2(tmp_path)
    assert torch.equal(imported.state_dict["decoder.token_embedding.weight"], sd["decoder.token_embedding.weight"])


def test_untied_projection_is_refused(tmp_path: Path) -> None:
    variables = whisper_spec_variables(random_state_dict(SMALL_DIMS), SMALL_DIMS)
    variables["decoder/projection/weight"] = variables["decoder/projection/weight"] + 1
    (tmp_path / "model.bin").write_bytes(serialise(variables)[0])
    with pytest.raises(CheckpointError, match="decoder/projection/weight"):
        read_ctranslate2(tmp_path / "model.bin")


def test_alignment_heads_and_config_extras(tmp_path: Path) -> None:
    write_model(tmp_path, alignment_heads=[[0, 1], [1, 0]])
    imported = read_ctranslate2(tmp_path)
    assert imported.alignment_heads.dtype == torch.bool
    assert torch.nonzero(imported.alignment_heads).tolist() == [[0, 1], [1, 0]]
    assert imported.extra["suppress_ids"] == [1, 2]
    (tmp_path / "config.json").write_text(json.dumps({"alignment_heads": [[5, 0]]}))
    with pytest.raises(CheckpointError, match="alignment head"):
        read_ctranslate2(tmp_path)
    (tmp_path / "config.json").unlink()
    assert read_ctranslate2(tmp_path).alignment_heads is None


def test_is_ctranslate2_dir(tmp_path: Path) -> None:
    assert not is_ctranslate2_dir(tmp_path)
    write_model(tmp_path / "one")
    write_model(tmp_path / "split", split=[50])
    assert is_ctranslate2_dir(tmp_path / "one") and is_ctranslate2_dir(tmp_path / "split")
    (tmp_path / "one" / "config.json").unlink()
    assert not is_ctranslate2_dir(tmp_path / "one")
    assert not is_ctranslate2_dir(tmp_path / "one" / "model.bin")


def test_missing_paths_raise_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        read_ctranslate2(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError):
        read_ctranslate2(tmp_path)  # a directory without model.bin
    with pytest.raises(ModelNotFoundError):
        read_ctranslate2(tmp_path, parts=[tmp_path / "model.bin.part1"])


# ---------------------------------------------------------------------------------------------------------------
# Corruption


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid int8 model.bin (so scales are exercised too), its layout and bytes."""
    directory = tmp_path_factory.mktemp("good")
    _, layout, data = write_model(directory, mode="int8")
    return layout, data


def _read_bytes(tmp_path: Path, data: bytes):
    (tmp_path / "model.bin").write_bytes(data)
    return read_ctranslate2(tmp_path / "model.bin")


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_every_truncation_is_refused(tmp_path: Path, good) -> None:
    layout, data = good
    offsets = {0, 1, 3, 4, 5, 10, 17, 20, 21, 22, len(data) - 1, len(data) - 5, layout.alias_count}
    for table in (layout.rank, layout.dtype, layout.nbytes, layout.data):
        for offset in list(table.values())[::7]:
            offsets.update({offset, offset + 1})
    offsets.update(range(1, len(data), max(1, len(data) // 97)))
    for offset in sorted(o for o in offsets if o < len(data)):
        with pytest.raises(CheckpointError, match="model.bin"):
            _read_bytes(tmp_path, data[:offset])


def test_unknown_dtype_id(tmp_path: Path, good) -> None:
    layout, data = good
    name = "encoder/conv2/weight"
    with pytest.raises(CheckpointError, match=f"{name} has unknown dtype id 9"):
        _read_bytes(tmp_path, _patch(data, layout.dtype[name], "<B", 9))


def test_oversized_byte_count_is_refused_before_allocating(tmp_path: Path, good) -> None:
    layout, data = good
    name = "decoder/embeddings/weight"
    with pytest.raises(CheckpointError, match=name):
        _read_bytes(tmp_path, _patch(data, layout.nbytes[name], "<I", 0xFFFFFFF0))
    # Shape and byte count agree, but are far larger than the file: the size check, not an allocation, fails.
    big = _patch(_patch(data, layout.rank[name] + 1, "<I", 0x3FFFFFFF), layout.nbytes[name], "<I", 0xFFFFFFFC)
    big = _patch(big, layout.rank[name] + 5, "<I", 1)
    big = _patch(big, layout.dtype[name], "<B", 0)  # float32: 0x3FFFFFFF x 1 x 4 bytes
    with pytest.raises(CheckpointError, match=f"{name} declares 4294967292 bytes but only"):
        _read_bytes(tmp_path, big)


def test_byte_count_inconsistent_with_shape(tmp_path: Path, good) -> None:
    layout, data = good
    name = "decoder/layer_0/ffn/linear_0/bias"
    nbytes = struct.unpack_from("<I", data, layout.nbytes[name])[0]
    with pytest.raises(CheckpointError, match=f"{name} declares {nbytes - 1} bytes"):
        _read_bytes(tmp_path, _patch(data, layout.nbytes[name], "<I", nbytes - 1))


def test_absurd_rank(tmp_path: Path, good) -> None:
    layout, data = good
    with pytest.raises(CheckpointError, match="rank 200"):
        _read_bytes(tmp_path, _patch(data, layout.rank["encoder/conv1/bias"], "<B", 200))


@pytest.mark.parametrize("version", [0, 1, 3, 7, 0xFFFFFFFF])
def test_bad_binary_version(tmp_path: Path, good, version: int) -> None:
    _, data = good
    with pytest.raises(CheckpointError, match=f"binary version is {version}"):
        _read_bytes(tmp_path, _patch(data, 0, "<I", version))


def test_wrong_spec_name_and_revision(tmp_path: Path) -> None:
    variables = whisper_spec_variables(random_state_dict(SMALL_DIMS), SMALL_DIMS)
    with pytest.raises(CheckpointError, match="TransformerSpec"):
        _read_bytes(tmp_path, serialise(variables, spec="TransformerSpec")[0])
    with pytest.raises(CheckpointError, match="revision is 4"):
        _read_bytes(tmp_path, serialise(variables, revision=4)[0])


def test_absurd_counts_and_trailing_bytes(tmp_path: Path, good) -> None:
    layout, data = good
    with pytest.raises(CheckpointError, match="declares 4294967295 variables"):
        _read_bytes(tmp_path, _patch(data, layout.variable_count, "<I", 0xFFFFFFFF))
    with pytest.raises(CheckpointError, match="declares 1000000 aliases"):
        _read_bytes(tmp_path, _patch(data, layout.alias_count, "<I", 1_000_000))
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        _read_bytes(tmp_path, data + b"\0")
    with pytest.raises(CheckpointError, match="empty"):
        _read_bytes(tmp_path, b"")


def test_bad_strings(tmp_path: Path, good) -> None:
    _, data = good
    assert data[4:6] == struct.pack("<H", len("WhisperSpec") + 1)
    with pytest.raises(CheckpointError, match="not NUL-terminated"):
        _read_bytes(tmp_path, data[: 5 + len("WhisperSpec") + 1] + b"X" + data[7 + len("WhisperSpec") :])
    with pytest.raises(CheckpointError, match="length 0"):
        _read_bytes(tmp_path, _patch(data, 4, "<H", 0))


def test_bad_aliases(tmp_path: Path) -> None:
    variables = whisper_spec_variables(random_state_dict(SMALL_DIMS), SMALL_DIMS)
    del variables["decoder/projection/weight"]
    with pytest.raises(CheckpointError, match="not a variable"):
        _read_bytes(tmp_path, serialise(variables, {"decoder/projection/weight": "nowhere"})[0])
    with pytest.raises(CheckpointError, match="repeats"):
        _read_bytes(tmp_path, serialise(variables, {"encoder/conv1/bias": "encoder/conv2/bias"})[0])


def test_layout_problems_name_the_variable(tmp_path: Path) -> None:
    sd = random_state_dict(SMALL_DIMS)
    base = whisper_spec_variables(sd, SMALL_DIMS)

    def refused(variables, match: str) -> None:
        with pytest.raises(CheckpointError, match=match):
            _read_bytes(tmp_path, serialise(variables)[0])

    missing = "decoder/layer_1/ffn/layer_norm/gamma"
    refused({k: v for k, v in base.items() if k != missing}, missing)
    refused({**base, "decoder/layer_0/self_attention/q_norm/gamma": torch.ones(16)}, "q_norm")
    refused({**base, "decoder/scale_embeddings": torch.tensor(1, dtype=torch.int8)}, "scale_embeddings")
    refused({**base, "encoder/num_heads": torch.tensor(3, dtype=torch.int16)}, "num_heads is 3")
    refused({**base, "encoder/conv1/bias": torch.ones(15)}, r"'encoder.conv1.bias' has shape \(15,\)")
    refused({**base, "encoder/conv1/weight": base["encoder/conv1/weight"].to(torch.int8)}, "weight_scale is missing")
    refused({**base, "encoder/conv1/bias": torch.ones(16, dtype=torch.int32)}, "stored as torch.int32")
    layers = {k.replace("decoder/layer_1/", "decoder/layer_5/"): v for k, v in base.items()}
    refused(layers, "numbered")
    ffn = {**base, "encoder/layer_0/ffn/linear_0/weight": torch.ones(48, 16)}
    ffn["encoder/layer_0/ffn/linear_0/bias"] = torch.ones(48)
    refused(ffn, "mlp.0")


def test_upstream_shapes_match_the_real_model() -> None:
    model = Whisper(ModelDimensions(**SMALL_DIMS))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == upstream_shapes(SMALL_DIMS)


def test_agrees_with_the_ctranslate2_writer(tmp_path: Path) -> None:
    """Files written by CTranslate2's own spec code (real aliasing and quantisation) import correctly."""
    import ctranslate2  # noqa: F401  (the test extra installs it)
    from ctranslate2.specs import model_spec, whisper_spec

    sd = random_state_dict(SMALL_DIMS, seed=3)
    for quantization in ("float16", "int8"):
        spec = whisper_spec.WhisperSpec(2, 2, 2, 2)
        for name, value in whisper_spec_variables(sd, SMALL_DIMS).items():
            if value.is_floating_point():
                scope, attr = name.rsplit("/", 1)
                # a copy: the writer quantises in place
                setattr(model_spec.index_spec(spec, scope), attr, value.numpy().copy())
        spec.register_vocabulary([f"t{i}" for i in range(SMALL_DIMS["n_vocab"])])
        spec.config.alignment_heads = [[1, 1]]
        spec.validate()
        spec.optimize(quantization=quantization)
        out = tmp_path / quantization
        out.mkdir()
        spec.save(str(out))
        imported = read_ctranslate2(out)
        assert imported.dims == SMALL_DIMS
        assert torch.nonzero(imported.alignment_heads).tolist() == [[1, 1]]
        for name, expected in sd.items():
            atol = float(expected.abs().max()) / 254 * 1.001 + 2e-3
            torch.testing.assert_close(imported.state_dict[name], expected, rtol=0, atol=atol)
