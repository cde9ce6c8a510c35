"""Reading and validating a ``.pt`` checkpoint: the bottom of the weights layer.

`load_pt` is the one place a ``.pt`` file is unpickled: ``torch.load(..., weights_only=True)`` onto the CPU
(memory-mapped where asked and the file allows it), every failure turned into one `CheckpointError` naming the file
(a refused pickle names the global it wanted; nothing in the file runs). `check_dims` and `check_state_dict` are
the one validation of a model's dims and tensors: our checkpoints (`read_checkpoint`), upstream's, the CTranslate2
and Hugging Face importers and the Hugging Face exporter all go through them, and they check every claim a file
makes (field types, layer counts, shapes) before anything is sized from it.
"""

import io
import pickle
import re
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

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

UNSAFE_PICKLE = "objects other than tensors and plain data, which weights_only loading does not execute"

_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")


def refused_global(exc: BaseException) -> Optional[str]:
    """The global a weights-only unpickler refused (``builtins.exec``, ``posix.system``, ...), or None.

    torch words the refusal in several ways ("Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module
    x is blocked") inside a long multi-line explanation; both name the global after the word GLOBAL.
    """
    match = re.search(r"GLOBAL\s+([\w.]+)", one_line(exc, limit=None))
    return match.group(1) if match else None


def load_pt(source: Union[PathLike, bytes], label: str, mmap: bool = False) -> object:
    """Unpickle a ``.pt`` file (or its bytes) with ``weights_only=True`` onto the CPU.

    label: how messages name the file (``checkpoint '/x/model.pt'``). mmap: map the file instead of reading it,
    where its format allows (legacy non-zip files are read). Raises `ModelNotFoundError` for a missing file and
    `CheckpointError` for anything else that is not a readable, safe pickle.
    """
    try:
        if isinstance(source, bytes):
            with io.BytesIO(source) as handle:
                return torch.load(handle, map_location="cpu", weights_only=True)
        if mmap:
            try:
                return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                pass  # a legacy (non-zip) file cannot be mapped; read it below
        with open(source, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{label} is a directory, not a .pt file") from None
    except pickle.UnpicklingError as error:
        refused = refused_global(error)
        if refused:
            raise CheckpointError(
                f"refusing {label}, which cannot be loaded safely: it holds {UNSAFE_PICKLE} "
                f"(Unsupported global {refused})"
            ) from None
        raise CheckpointError(f"cannot read {label}: truncated or not a PyTorch file") from None
    except Exception as error:  # torch's unpickler raises many types on garbage (IndexError, struct.error, ...)
        raise CheckpointError(f"cannot read {label}: truncated or not a PyTorch file ({first_line(error)})") from None


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


def check_dims(dims: object, origin: str) -> Dict[str, int]:
    """``dims`` as plain ints, after checking that it has exactly the ModelDimensions fields, each a positive
    integer, and that every head count divides its width. origin: how messages name the source."""
    if not isinstance(dims, dict):
        raise CheckpointError(
            f"{origin} has invalid 'dims': expected a dict of Whisper's ModelDimensions, got {type(dims).__name__}"
        )
    if set(dims) != set(DIM_KEYS):
        wrong = sorted(str(key) for key in set(dims).symmetric_difference(DIM_KEYS))
        raise CheckpointError(f"{origin} dims do not match Whisper's ModelDimensions (differ in {wrong})")
    out: Dict[str, int] = {}
    for key in DIM_KEYS:
        value = dims[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{origin} dims: {key} is {one_line(repr(value), 40)}, expected a positive integer")
        out[key] = int(value)
    for head, state in (("n_audio_head", "n_audio_state"), ("n_text_head", "n_text_state")):
        if out[state] % out[head]:  # also bounds the head count by the width before anything is sized from it
            raise CheckpointError(
                f"{origin} dims: {head} {out[head]} does not divide {state} {out[state]}; "
                "attention splits the width evenly between heads"
            )
    return out


def check_state_dict(state: object, dims: Dict[str, int], origin: str, complete: bool = True) -> None:
    """Refuse tensors that do not fit ``dims`` (checked with `check_dims`), before a model of those dims exists.

    In order: a dict of dense floating-point (or bool) tensors by name; one ``<side>.blocks.N`` group per layer the
    dims claim (this bounds the names there are to check); every upstream tensor present with the shape the dims
    give it. complete: also require exactly upstream's names (importers and exporters); without it, missing and
    scheme-specific tensors are left to `whisper_rope.weights.loading.adapt_state_dict`.
    """
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{origin} has an invalid 'model_state_dict': expected a dict of tensors by name")
    odd = [k for k, v in state.items() if v.is_nested or v.layout != torch.strided]
    if odd:
        raise CheckpointError(f"{origin}: tensor {odd[0]!r} is sparse or nested, expected a dense tensor")
    bad = [k for k, v in state.items() if not (v.is_floating_point() or v.dtype == torch.bool)]
    if bad:
        raise CheckpointError(
            f"{origin}: tensor {bad[0]!r} has dtype {state[bad[0]].dtype}, expected a floating-point dtype"
        )
    _check_layers(state, dims, origin)
    expected = upstream_shapes(dims)
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{origin}: tensor {key!r} has shape {tuple(state[key].shape)}, the model's dims expect {shape}"
            )
    if complete:
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(
                f"{origin} lacks tensor {missing[0]!r} (and {len(missing) - 1} more) that Whisper needs"
            )
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise CheckpointError(f"{origin} has tensor {unexpected[0]!r}, which upstream Whisper does not have")


def _check_layers(state: Dict[str, Tensor], dims: Dict[str, int], origin: str) -> None:
    present: Dict[str, set] = {"encoder": set(), "decoder": set()}
    for key in state:
        match = _BLOCK.match(key)
        if match:
            present[match.group(1)].add(int(match.group(2)))
    for side, field_name in (("encoder", "n_audio_layer"), ("decoder", "n_text_layer")):
        if present[side] != set(range(dims[field_name])):
            raise CheckpointError(
                f"{origin}: dims say {dims[field_name]} {side} layers, its tensors hold "
                f"{len(present[side])} ({side}.blocks.N for N in {_ranges(present[side])})"
            )


def _ranges(numbers: set) -> str:
    if not numbers:
        return "none"
    ordered = sorted(numbers)
    return f"{ordered[0]}..{ordered[-1]}" if ordered == list(range(ordered[0], ordered[-1] + 1)) else str(ordered[:8])


def read_checkpoint(source: Union[PathLike, bytes], name: Optional[str] = None, mmap: bool = False) -> dict:
    """Read a ``.pt`` checkpoint (ours or upstream's) with `load_pt` and validate it (`validate_checkpoint`).

    name: how messages name it (default: the path). mmap: map the file where its format allows (see `load_pt`).
    """
    label = name or (str(source) if not isinstance(source, bytes) else "checkpoint bytes")
    return validate_checkpoint(load_pt(source, f"checkpoint {label!r}", mmap=mmap), label)


def validate_checkpoint(checkpoint: object, label: str) -> dict:
    """Check the layout every reader relies on (`check_dims`, `check_state_dict` without ``complete``, the
    alignment heads' type); raise CheckpointError naming what is wrong. Returns ``checkpoint``."""
    origin = f"checkpoint {label!r}"
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"{origin} is not a Whisper checkpoint: expected a dict with 'dims' and 'model_state_dict'"
        )
    dims = check_dims(checkpoint["dims"], origin)
    check_state_dict(checkpoint["model_state_dict"], dims, origin, complete=False)
    heads = checkpoint.get("alignment_heads")
    if heads is not None and not isinstance(heads, (bytes, Tensor)):
        raise CheckpointError(
            f"{origin} has invalid 'alignment_heads': expected a bool tensor (layers, heads) or upstream's "
            f"encoded bytes, got {type(heads).__name__}"
        )
    return checkpoint
