"""Build small synthetic CTranslate2 Whisper models for the converter tests.

The writer here is deliberately independent of ``whisper_rope.weights.ctranslate2``: it goes from upstream names
to the WhisperSpec layout (the reader goes the other way), so a mistake in either shows up as a failed round trip.
:func:`serialise` also reports where each header field landed, so tests can corrupt specific bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# CTranslate2 DataType ids.
DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}

# Tiny dims; the vocabulary is far from Whisper's so the importer cannot lean on the real size.
SMALL_DIMS = {
    "n_mels": 8,
    "n_audio_ctx": 12,
    "n_audio_state": 16,
    "n_audio_head": 2,
    "n_audio_layer": 2,
    "n_vocab": 100,
    "n_text_ctx": 10,
    "n_text_state": 16,
    "n_text_head": 2,
    "n_text_layer": 2,
}


def random_state_dict(dims: Dict[str, int], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random float32 tensors under every name of ``whisper.model.Whisper(ModelDimensions(**dims))``."""
    from whisper.model import ModelDimensions, Whisper

    generator = torch.Generator().manual_seed(seed)
    template = Whisper(ModelDimensions(**dims)).state_dict()
    return {name: torch.randn(t.shape, generator=generator) for name, t in template.items()}


def _pack_linear(out: Dict[str, torch.Tensor], ct2: str, sd: Dict[str, torch.Tensor], up: str) -> None:
    out[f"{ct2}/weight"] = sd[f"{up}.weight"]
    out[f"{ct2}/bias"] = sd[f"{up}.bias"]


def _pack_norm(out: Dict[str, torch.Tensor], ct2: str, sd: Dict[str, torch.Tensor], up: str) -> None:
    out[f"{ct2}/gamma"] = sd[f"{up}.weight"]
    out[f"{ct2}/beta"] = sd[f"{up}.bias"]


def _pack_fused(out: Dict[str, torch.Tensor], ct2: str, sd: Dict[str, torch.Tensor], ups: Sequence[str]) -> None:
    """Stack projections on rows; the bias-less key gets zeros, as CTranslate2's converter does."""
    out[f"{ct2}/weight"] = torch.cat([sd[f"{up}.weight"] for up in ups])
    biases = []
    for up in ups:
        bias = sd.get(f"{up}.bias")
        biases.append(bias if bias is not None else torch.zeros(sd[f"{up}.weight"].shape[0]))
    out[f"{ct2}/bias"] = torch.cat(biases)


def whisper_spec_variables(sd: Dict[str, torch.Tensor], dims: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """The WhisperSpec variables (float32 weights plus integer metadata scalars) for an upstream state dict."""
    v: Dict[str, torch.Tensor] = {}
    _pack_linear(v, "encoder/conv1", sd, "encoder.conv1")
    _pack_linear(v, "encoder/conv2", sd, "encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    _pack_norm(v, "encoder/layer_norm", sd, "encoder.ln_post")
    v["encoder/num_heads"] = torch.tensor(dims["n_audio_head"], dtype=torch.int16)
    for i in range(dims["n_audio_layer"]):
        ct2, up = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _pack_fused(v, f"{ct2}/self_attention/linear_0", sd, [f"{up}.attn.query", f"{up}.attn.key", f"{up}.attn.value"])
        _pack_linear(v, f"{ct2}/self_attention/linear_1", sd, f"{up}.attn.out")
        _pack_norm(v, f"{ct2}/self_attention/layer_norm", sd, f"{up}.attn_ln")
        _pack_ffn(v, ct2, sd, up)
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/projection/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    _pack_norm(v, "decoder/layer_norm", sd, "decoder.ln")
    for i in range(dims["n_text_layer"]):
        ct2, up = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _pack_fused(v, f"{ct2}/self_attention/linear_0", sd, [f"{up}.attn.query", f"{up}.attn.key", f"{up}.attn.value"])
        _pack_linear(v, f"{ct2}/self_attention/linear_1", sd, f"{up}.attn.out")
        _pack_norm(v, f"{ct2}/self_attention/layer_norm", sd, f"{up}.attn_ln")
        _pack_linear(v, f"{ct2}/attention/linear_0", sd, f"{up}.cross_attn.query")
        _pack_fused(v, f"{ct2}/attention/linear_1", sd, [f"{up}.cross_attn.key", f"{up}.cross_attn.value"])
        _pack_linear(v, f"{ct2}/attention/linear_2", sd, f"{up}.cross_attn.out")
        _pack_norm(v, f"{ct2}/attention/layer_norm", sd, f"{up}.cross_attn_ln")
        _pack_ffn(v, ct2, sd, up)
    # Metadata scalars as real conversions store them.
    v["decoder/num_heads"] = torch.tensor(dims["n_text_head"], dtype=torch.int16)
    v["decoder/activation"] = torch.tensor(3, dtype=torch.int8)
    v["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    v["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    v["decoder/alibi"] = torch.tensor(0, dtype=torch.int8)
    v["decoder/start_from_zero_embedding"] = torch.tensor(0, dtype=torch.int8)
    v["decoder/alignment_heads"] = torch.tensor(1, dtype=torch.int16)
    v["decoder/alignment_layer"] = torch.tensor(-1, dtype=torch.int16)
    return v


def _pack_ffn(v: Dict[str, torch.Tensor], ct2: str, sd: Dict[str, torch.Tensor], up: str) -> None:
    _pack_linear(v, f"{ct2}/ffn/linear_0", sd, f"{up}.mlp.0")
    _pack_linear(v, f"{ct2}/ffn/linear_1", sd, f"{up}.mlp.2")
    _pack_norm(v, f"{ct2}/ffn/layer_norm", sd, f"{up}.mlp_ln")


def _is_quantisable(name: str, tensor: torch.Tensor) -> bool:
    """Linear, conv and embedding weights are the ones CTranslate2 quantises (they have a ``weight_scale``)."""
    return name.endswith("/weight") and tensor.dim() >= 2 and "layer_norm" not in name


def quantise(variables: Dict[str, torch.Tensor], mode: str) -> Dict[str, torch.Tensor]:
    """Apply a CTranslate2 quantisation mode: ``float32``, ``float16``, ``bfloat16``, ``int8`` (weights int8 with a
    per-row scale, the rest float32), ``int8_float16`` (the rest float16) or ``int16`` (one scale per tensor)."""
    others = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8_float16": torch.float16}
    rest = others.get(mode, torch.float32)
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in variables.items():
        if not tensor.is_floating_point():
            out[name] = tensor
        elif mode.startswith("int8") and _is_quantisable(name, tensor):
            rows = tensor.reshape(tensor.shape[0], -1)
            amax = rows.abs().amax(dim=1)
            scale = 127.0 / torch.where(amax == 0, torch.full_like(amax, 127.0), amax)
            out[name] = torch.round(rows * scale[:, None]).to(torch.int8).reshape(tensor.shape)
            out[f"{name}_scale"] = scale.to(torch.float32)
        elif mode == "int16" and _is_quantisable(name, tensor):
            scale = torch.tensor(2.0**10 / float(tensor.abs().max()), dtype=torch.float32)
            out[name] = torch.round(tensor * scale).clamp(-32768, 32767).to(torch.int16)
            out[f"{name}_scale"] = scale
        else:
            out[name] = tensor.to(rest)
    return out


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian row-major bytes (bfloat16 via its 16-bit pattern, which numpy lacks)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


@dataclass
class Layout:
    """Byte offsets of header fields in a serialised model.bin, per variable name."""

    rank: Dict[str, int] = field(default_factory=dict)
    dtype: Dict[str, int] = field(default_factory=dict)
    nbytes: Dict[str, int] = field(default_factory=dict)
    data: Dict[str, int] = field(default_factory=dict)
    variable_count: int = 0
    alias_count: int = 0


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def serialise(
    variables: Dict[str, torch.Tensor],
    aliases: Optional[Dict[str, str]] = None,
    spec: str = "WhisperSpec",
    version: int = 6,
    revision: int = 3,
) -> Tuple[bytes, Layout]:
    """model.bin bytes for ``variables`` (sorted by name, as CTranslate2 writes them) and the field layout."""
    layout = Layout()
    buf = bytearray(struct.pack("<I", version) + _string(spec) + struct.pack("<I", revision))
    layout.variable_count = len(buf)
    buf += struct.pack("<I", len(variables))
    for name in sorted(variables):
        tensor = variables[name]
        buf += _string(name)
        layout.rank[name] = len(buf)
        buf += struct.pack("<B", tensor.dim()) + b"".join(struct.pack("<I", d) for d in tensor.shape)
        payload = tensor_bytes(tensor)
        layout.dtype[name] = len(buf)
        buf += struct.pack("<B", DTYPE_IDS[tensor.dtype])
        layout.nbytes[name] = len(buf)
        buf += struct.pack("<I", len(payload))
        layout.data[name] = len(buf)
        buf += payload
    aliases = aliases or {}
    layout.alias_count = len(buf)
    buf += struct.pack("<I", len(aliases))
    for alias in sorted(aliases):
        buf += _string(alias) + _string(aliases[alias])
    return bytes(buf), layout


def config_json(dims: Dict[str, int], alignment_heads: Optional[List[List[int]]] = None) -> Dict[str, object]:
    """A faster-whisper style config.json."""
    if alignment_heads is None:
        alignment_heads = [[layer, 0] for layer in range(dims["n_text_layer"] // 2, dims["n_text_layer"])]
    return {"alignment_heads": alignment_heads, "lang_ids": [], "suppress_ids": [1, 2], "suppress_ids_begin": [3]}


def write_model(
    directory: Path,
    dims: Dict[str, int] = SMALL_DIMS,
    mode: str = "float32",
    seed: int = 0,
    alias_projection: bool = True,
    split: Optional[Sequence[int]] = None,
    alignment_heads: Optional[List[List[int]]] = None,
) -> Tuple[Dict[str, torch.Tensor], Layout, bytes]:
    """Write ``directory``/model.bin (or model.bin.part1.. cut at the byte offsets in ``split``) and config.json.

    Returns:
        (the upstream float32 state dict that was serialised, the header layout, the whole model.bin bytes).
    """
    directory.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(dims, seed)
    variables = whisper_spec_variables(sd, dims)
    aliases = {}
    if alias_projection:  # CTranslate2 aliases before quantising, so the alias carries no scale of its own
        del variables["decoder/projection/weight"]
        aliases["decoder/projection/weight"] = "decoder/embeddings/weight"
    variables = quantise(variables, mode)
    data, layout = serialise(variables, aliases)
    if split:
        cuts = [0, *split, len(data)]
        for i, (lo, hi) in enumerate(zip(cuts, cuts[1:]), start=1):
            (directory / f"model.bin.part{i}").write_bytes(data[lo:hi])
    else:
        (directory / "model.bin").write_bytes(data)
    (directory / "config.json").write_text(json.dumps(config_json(dims, alignment_heads)))
    return sd, layout, data
