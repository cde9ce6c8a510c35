"""Reading and validating a ``.pt`` checkpoint: the bottom of the weights layer.

Every ``.pt`` file whisper_rope reads goes through `read_checkpoint` (or `load_upstream`, which memory-maps what it
can and falls back to it): ``torch.load(..., weights_only=True)`` onto the CPU, a refused pickle named in one line,
then the layout every reader relies on (``dims``, a dict of dense floating-point tensors whose shapes fit the dims)
checked *before* a model of those dims is allocated. The importers (CTranslate2, Hugging Face) check their result
with the same `check_dims`/`check_state_dict`.
"""

import io
import pickle
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor
from whisper.model import ModelDimensions

from ..errors import CheckpointError, ModelNotFoundError, PathLike, first_line, one_line

# The fields of ``whisper.model.ModelDimensions``, in its order.
DIM_KEYS: Tuple[str, ...] = (
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
)


def refused_global(exc: BaseException) -> Optional[str]:
    """The global a weights-only unpickler refused (``builtins.exec``, ``posix.system``, ...), or None.

    torch words the refusal in several ways ("Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module
    x is blocked") inside a long multi-line explanation; both name the global after the word GLOBAL.
    """
    match = re.search(r"GLOBAL\s+([\w.]+)", one_line(exc, limit=None))
    return match.group(1) if match else None


UNSAFE_PICKLE = "objects other than tensors and plain data, which weights_only loading does not execute"


def upstream_shapes(dims: Dict[str, int]) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name of ``whisper.model.Whisper(ModelDimensions(**dims)).state_dict()`` and its shape.

    Written out by hand rather than by instantiating the model, because instantiating allocates the whole model
    (and upstream's constructor does not run on the meta device).
    """
    shapes: Dict[str, Tuple[int, ...]] = {}
    d_audio, d_text = dims["n_audio_state"], dims["n_text_state"]

    def linear(prefix: str, d_out: int, d_in: int, bias: bool = True) -> None:
        shapes[f"{prefix}.weight"] = (d_out, d_in)
        if bias:
            shapes[f"{prefix}.bias"] = (d_out,)

    def norm(prefix: str, d: int) -> None:
        shapes[f"{prefix}.weight"] = (d,)
        shapes[f"{prefix}.bias"] = (d,)

    def attention(prefix: str, d: int) -> None:
        linear(f"{prefix}.query", d, d)
        linear(f"{prefix}.key", d, d, bias=False)  # upstream's key projection has no bias
        linear(f"{prefix}.value", d, d)
        linear(f"{prefix}.out", d, d)

    def block(prefix: str, d: int, cross: bool) -> None:
        attention(f"{prefix}.attn", d)
        norm(f"{prefix}.attn_ln", d)
        if cross:
            attention(f"{prefix}.cross_attn", d)
            norm(f"{prefix}.cross_attn_ln", d)
        linear(f"{prefix}.mlp.0", 4 * d, d)
        linear(f"{prefix}.mlp.2", d, 4 * d)
        norm(f"{prefix}.mlp_ln", d)

    shapes["encoder.positional_embedding"] = (dims["n_audio_ctx"], d_audio)
    shapes["encoder.conv1.weight"] = (d_audio, dims["n_mels"], 3)
    shapes["encoder.conv1.bias"] = (d_audio,)
    shapes["encoder.conv2.weight"] = (d_audio, d_audio, 3)
    shapes["encoder.conv2.bias"] = (d_audio,)
    for i in range(dims["n_audio_layer"]):
        block(f"encoder.blocks.{i}", d_audio, cross=False)
    norm("encoder.ln_post", d_audio)
    shapes["decoder.token_embedding.weight"] = (dims["n_vocab"], d_text)
    shapes["decoder.positional_embedding"] = (dims["n_text_ctx"], d_text)
    for i in range(dims["n_text_layer"]):
        block(f"decoder.blocks.{i}", d_text, cross=True)
    norm("decoder.ln", d_text)
    return shapes


def check_state_dict(state_dict: Dict[str, torch.Tensor], dims: Dict[str, int], origin: str) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly the upstream names and shapes for ``dims``."""
    expected = upstream_shapes(dims)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CheckpointError(f"{origin} lacks tensor {missing[0]} (and {len(missing) - 1} more) that Whisper needs.")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise CheckpointError(f"{origin} has tensor {unexpected[0]}, which upstream Whisper does not have.")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(
                f"{origin}: tensor {name} has shape {tuple(state_dict[name].shape)}, expected {shape}."
            )


def check_dims(dims: Dict[str, Any], origin: str) -> Dict[str, int]:
    """Return ``dims`` as plain ints after checking it has exactly the ModelDimensions keys, all positive."""
    keys = set(dims)
    if keys != set(DIM_KEYS):
        wrong = sorted(keys.symmetric_difference(DIM_KEYS))
        raise CheckpointError(f"{origin} dims do not match Whisper's ModelDimensions (differ in {wrong}).")
    out: Dict[str, int] = {}
    for key in DIM_KEYS:
        value = dims[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{origin} dims: {key} is {value!r}, expected a positive integer.")
        out[key] = int(value)
    for head, state in (("n_audio_head", "n_audio_state"), ("n_text_head", "n_text_state")):
        if out[state] % out[head]:  # also bounds the head count by the width before anything is sized from it
            raise CheckpointError(
                f"{origin} dims: {head} {out[head]} does not divide {state} {out[state]}; "
                "attention splits the width evenly between heads."
            )
    return out


def read_checkpoint(source: Union[PathLike, bytes], name: Optional[str] = None) -> dict:
    """Read a ``.pt`` checkpoint (ours or upstream's) with ``weights_only=True`` onto the CPU and validate it."""
    label = name or (str(source) if not isinstance(source, bytes) else "checkpoint bytes")
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as fp:
            checkpoint = torch.load(fp, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelNotFoundError(f"checkpoint file {label!r} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {label!r} is a directory, not a .pt file") from None
    except pickle.UnpicklingError as error:
        refused = refused_global(error)
        if refused:
            raise CheckpointError(
                f"refusing checkpoint {label!r}: it holds {UNSAFE_PICKLE} (Unsupported global {refused})"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {label!r}: truncated or not a PyTorch file") from None
    except Exception as error:  # torch's unpickler raises many types on garbage (IndexError, struct.error, ...)
        raise CheckpointError(
            f"cannot read checkpoint {label!r}: truncated or not a PyTorch file ({first_line(error)})"
        ) from None
    return validate_checkpoint(checkpoint, label)


def validate_checkpoint(checkpoint: object, label: str) -> dict:
    """Check the layout every reader relies on; raise CheckpointError naming what is wrong."""
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {label!r} is not a Whisper checkpoint: expected a dict with 'dims' and 'model_state_dict'"
        )
    dims = checkpoint["dims"]
    expected = {f.name for f in fields(ModelDimensions)}
    if (
        not isinstance(dims, dict)
        or set(dims) != expected
        or not all(isinstance(v, int) and v > 0 for v in dims.values())
    ):
        raise CheckpointError(
            f"checkpoint {label!r} has invalid 'dims': expected positive integers for {sorted(expected)}"
        )
    state = checkpoint["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"checkpoint {label!r} has an invalid 'model_state_dict': expected a dict of tensors")
    odd = [k for k, v in state.items() if v.is_nested or v.layout != torch.strided]
    if odd:
        raise CheckpointError(f"checkpoint {label!r}: tensor {odd[0]!r} is sparse or nested, expected a dense tensor")
    bad = [k for k, v in state.items() if not (v.is_floating_point() or v.dtype == torch.bool)]
    if bad:
        raise CheckpointError(
            f"checkpoint {label!r}: tensor {bad[0]!r} has dtype {state[bad[0]].dtype}, expected a floating-point dtype"
        )
    heads = checkpoint.get("alignment_heads")
    if heads is not None and not isinstance(heads, (bytes, Tensor)):
        raise CheckpointError(
            f"checkpoint {label!r} has invalid 'alignment_heads': expected a bool tensor (layers, heads) or upstream's "
            f"encoded bytes, got {type(heads).__name__}"
        )
    _check_against_dims(state, dims, label)
    return checkpoint


_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")


def _check_against_dims(state: Dict[str, Tensor], dims: Dict[str, int], label: str) -> None:
    """Refuse a state dict that does not fit its own dims *before* a model of those dims is allocated.

    Layer counts come first (they bound how many names there are to check), then the shape of every upstream tensor
    present. Missing and scheme-specific tensors are left to `adapt_state_dict`.
    """
    present = {"encoder": set(), "decoder": set()}
    for key in state:
        match = _BLOCK.match(key)
        if match:
            present[match.group(1)].add(int(match.group(2)))
    for side, field_name in (("encoder", "n_audio_layer"), ("decoder", "n_text_layer")):
        if present[side] != set(range(dims[field_name])):
            raise CheckpointError(
                f"checkpoint {label!r}: dims say {dims[field_name]} {side} layers, its tensors hold "
                f"{len(present[side])} ({side}.blocks.N for N in {_ranges(present[side])})"
            )
    for key, shape in upstream_shapes(dims).items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"checkpoint {label!r}: tensor {key!r} has shape {tuple(state[key].shape)}, the model's dims "
                f"expect {shape}"
            )


def _ranges(numbers: set) -> str:
    if not numbers:
        return "none"
    ordered = sorted(numbers)
    return f"{ordered[0]}..{ordered[-1]}" if ordered == list(range(ordered[0], ordered[-1] + 1)) else str(ordered[:8])


def load_upstream(path: Path) -> Dict[str, Any]:
    """An upstream-format checkpoint dict, loaded with ``weights_only=True``: memory-mapped where the file allows it,
    else (legacy non-zip files cannot be mapped) through :func:`read_checkpoint`, which also
    words every refusal (an unsafe pickle, a truncated file) as the library's loaders do."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy format, or a bad or unsafe pickle: read_checkpoint reads or refuses it in one line
        checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"Checkpoint {path} is not in upstream Whisper format (a dict with dims and model_state_dict)."
        )
    if not isinstance(checkpoint["dims"], dict) or not isinstance(checkpoint["model_state_dict"], dict):
        raise CheckpointError(f"Checkpoint {path}: dims and model_state_dict must both be dicts.")
    return checkpoint
