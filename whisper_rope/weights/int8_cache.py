"""int8 models of named checkpoints cached in the form they run in, so that a process loads them instead of
quantising them again.

`quantize_int8` computes every int8 layer's scales and values from fp32 weights: on tiny.en that, and building the
fp32 model it starts from, is most of what loading costs. The first int8 load of a model name (``tiny.en`` ...)
writes the result into whisper_rope's cache directory (`packages.resolve_cache_dir`) as a safetensors file; later
loads read it (tensors and JSON metadata only: nothing is unpickled) and rebuild the same layers bit for bit
(`Int8Linear.from_int8`).

The file is ``<cache>/<source stem>-int8-<key>.safetensors``: the key hashes the source file's content
(`packages.content_hash`, remembered by path, size and mtime), the requested variant and rotary options and
`FORMAT`. It holds, per int8 layer ``NAME``, ``NAME.int8_weight`` (int8, (out, in)), ``NAME.int8_scale`` (float64,
(out,)) and ``NAME.int8_bias`` (fp32, where the layer has one); every other tensor under its ``state_dict`` name;
and in its metadata what `load_model` sets besides tensors (`Int8Model`). A file that does not match the model its
metadata describes (damaged, truncated, written by code with other int8 layers) is refused in one `CheckpointError`;
`load_model` then quantises afresh and writes it again.

Only model names are cached, not paths: a path is often one of many checkpoints of a training run, each of which
would leave a file behind.
"""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from whisper.model import ModelDimensions

from ..compute_type import OUTPUT_PROJECTION, Int8Linear, int8_layer_names, mark_int8, set_submodule
from ..errors import CheckpointError, one_line
from ..fs.atomic import atomic_write
from ..model import WhisperRope, WithoutRandomInit
from . import packages
from .common import alignment_pairs
from .format import alignment_mask, check_dims

logger = logging.getLogger("whisper_rope")

#: Bump when `quantize_int8` would compute other values from the same weights, so that older files are not reused.
FORMAT = "whisper_rope-int8-2"
_SUFFIXES = ("int8_weight", "int8_scale", "int8_bias")
LOOKUP_TABLE = "decoder.token_embedding.weight"


@dataclass
class Int8Model:
    """What an int8 model is besides its tensors: enough to build it again and to say what `load_model` said.

    dims: the model's dims; variant, rotary_theta, gated_rotary: how it was built; table_scale: [encoder, decoder];
    alignment_heads: [layer, head] pairs; stored_variant, trained_unpadded, unpadded_margin: the source checkpoint's;
    report: the `LoadReport` fields of the load that quantised it.
    """

    dims: Dict[str, int]
    variant: str
    rotary_theta: float
    gated_rotary: bool
    table_scale: List[float]
    alignment_heads: List[List[int]]
    stored_variant: str
    trained_unpadded: bool
    unpadded_margin: int
    report: Dict[str, object]


def cache_file(source: Path, settings: Dict[str, object]) -> Path:
    """Where the int8 model of checkpoint file ``source`` loaded with ``settings`` (the requested variant and rotary
    options, as JSON values) is cached."""
    directory = packages.resolve_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = {"format": FORMAT, "source": packages.content_hash([source], directory), "settings": settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = source.name.split(".pt")[0] if source.name.endswith(".pt") else source.stem
    return directory / f"{stem}-int8-{digest}.safetensors"


def save(model: WhisperRope, info: Int8Model, path: Path) -> Path:
    """Write int8 ``model`` (from `quantize_int8`) and ``info`` to ``path``, atomically."""
    tensors: Dict[str, Tensor] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, Int8Linear):
            continue
        values, scales = layer.int8_weight()
        tensors[f"{name}.int8_weight"], tensors[f"{name}.int8_scale"] = values, scales
        if layer.bias is not None:
            tensors[f"{name}.int8_bias"] = layer.bias
    tensors.update(model.state_dict())  # what the int8 layers do not hold: norms, convs, embeddings, fp32 layers
    payload = safetensors_bytes(
        {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
        metadata={"format": FORMAT, "model": json.dumps(asdict(info))},
    )
    return atomic_write(path, lambda handle: handle.write(payload))


def load(path: Path) -> Tuple[WhisperRope, Int8Model]:
    """The int8 model cached at ``path``, on the CPU, and what its metadata says of it.

    Raises `CheckpointError` (naming the file) for anything that is not a complete file of this `FORMAT` for the
    model its metadata describes.
    """
    label = f"cached int8 model {path}"
    info, tensors = _read(path, label)
    dims = ModelDimensions(**check_dims(info.dims, label))
    with WithoutRandomInit():  # every tensor comes from the file
        model = WhisperRope(dims, info.variant, rotary_theta=info.rotary_theta, gated_rotary=info.gated_rotary)
    for name in int8_layer_names(model):
        set_submodule(model, name, _int8_layer(model, name, tensors, label))
    _check_tensors(model.state_dict(), tensors, label)
    model.load_state_dict(tensors, strict=True, assign=True)
    heads = alignment_mask(info.alignment_heads, dims.n_text_layer, dims.n_text_head, label)
    model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    model.set_table_scales(*info.table_scale)
    return mark_int8(model), info


def _read(path: Path, label: str) -> Tuple[Int8Model, Dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{label} is of format {metadata.get('format')!r}, expected {FORMAT!r}")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        fields = json.loads(metadata["model"])
        return Int8Model(**fields), tensors
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{label} cannot be read: {one_line(error)}") from None


def _int8_layer(model: WhisperRope, name: str, tensors: Dict[str, Tensor], label: str) -> Int8Linear:
    """Take layer ``name``'s tensors out of ``tensors`` and build it, after checking them against the fp32 layer
    (or, for `OUTPUT_PROJECTION`, the token embedding) it stands for."""
    if name == OUTPUT_PROJECTION:
        shape, has_bias = tuple(model.decoder.token_embedding.weight.shape), False
    else:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{label}: {name} is no Linear layer of this model")
        shape, has_bias = tuple(linear.weight.shape), linear.bias is not None
    expected = {"int8_weight": (torch.int8, shape), "int8_scale": (torch.float64, shape[:1])}
    if has_bias:
        expected["int8_bias"] = (torch.float32, shape[:1])
    found = {}
    for suffix in _SUFFIXES:
        tensor = tensors.pop(f"{name}.{suffix}", None)
        if (tensor is None) != (suffix not in expected):
            raise CheckpointError(f"{label}: {name}.{suffix} is {'missing' if tensor is None else 'unexpected'}")
        if tensor is not None and (tensor.dtype, tuple(tensor.shape)) != expected[suffix]:
            dtype, wanted = expected[suffix]
            raise CheckpointError(
                f"{label}: {name}.{suffix} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {wanted}"
            )
        found[suffix] = tensor
    if not bool(torch.isfinite(found["int8_scale"]).all()) or not bool((found["int8_scale"] > 0).all()):
        raise CheckpointError(f"{label}: {name}.int8_scale holds a scale that is not finite and positive")
    return Int8Linear.from_int8(found["int8_weight"], found["int8_scale"], found.get("int8_bias"))


def _check_tensors(expected: Dict[str, Tensor], tensors: Dict[str, Tensor], label: str) -> None:
    """``tensors`` has exactly ``expected``'s names, shapes and dtypes. (Their values were checked, finite, in the
    checkpoint they were quantised from.)"""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{label}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for name, tensor in tensors.items():
        want = expected[name]
        dtypes = (want.dtype, torch.float16) if name == LOOKUP_TABLE else (want.dtype,)  # `narrow_lookup_table`
        if tensor.dtype not in dtypes or tensor.shape != want.shape:
            raise CheckpointError(
                f"{label}: {name} is {tensor.dtype} {tuple(tensor.shape)}, expected {want.dtype} {tuple(want.shape)}"
            )


def info_of(
    model: WhisperRope, stored_variant: str, trained_unpadded: bool, unpadded_margin: int, report: Dict[str, object]
) -> Int8Model:
    """The `Int8Model` of a freshly loaded ``model``."""
    return Int8Model(
        dims=asdict(model.dims),
        variant=model.variant,
        rotary_theta=model.rotary_theta,
        gated_rotary=model.gated_rotary,
        table_scale=list(model.settings.table_scales),
        alignment_heads=alignment_pairs(model.alignment_heads_dense()),
        stored_variant=stored_variant,
        trained_unpadded=trained_unpadded,
        unpadded_margin=unpadded_margin,
        report=report,
    )


def cached_or_none(path: Optional[Path]) -> Optional[Tuple[WhisperRope, Int8Model]]:
    """`load` of ``path`` where that file exists; None where it does not, or cannot be used (a warning says so,
    and the file, derived data of ours, is removed so that the caller writes it again)."""
    if path is None or not path.is_file():
        return None
    try:
        return load(path)
    except CheckpointError as error:
        logger.warning("%s; quantising the model again", one_line(error))
        path.unlink(missing_ok=True)
        return None
