"""Reading and validating a ``.pt`` checkpoint: the bottom of the weights layer.

`load_pt` is the one place a ``.pt`` file is unpickled: ``torch.load(..., weights_only=True)`` onto the CPU
(memory-mapped where asked and the file allows it), every failure turned into one `CheckpointError` naming the file
(a refused pickle names the global it wanted; nothing in the file runs). `check_dims` and `check_state_dict` are
the one validation of a model's dims and tensors: our checkpoints (`read_checkpoint`), upstream's, the CTranslate2
and Hugging Face importers and the Hugging Face exporter all go through them, and they check every claim a file
makes (field types, layer counts, shapes) before anything is sized from it.
"""

import io
import math
import pickle
import re
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import (
    CheckpointError,
    ModelNotFoundError,
    OutOfResources,
    PathLike,
    first_line,
    one_line,
    out_of_resources,
)
from ..fields import EOT_PENALTY
from ..positional import ROTARY_THETA

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

#: The key a checkpoint of any variant but upstream's adds to its dims (holding the variant's name), so that
#: upstream's ``whisper.load_model`` fails loudly on it (``ModelDimensions() got an unexpected keyword argument
#: 'whisper_rope_variant'``) instead of reading another positional variant as plain Whisper: a
#: ``rotary+sinusoidal/learned`` file has exactly upstream's tensor names. whisper_rope reads files with and
#: without it (files written before it carry the variant only in ``variant``).
VARIANT_MARKER = "whisper_rope_variant"

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
    `CheckpointError` for anything else that is not a readable, safe pickle. Running out of memory or threads is the
    machine's fault, not the file's: `OutOfResources` naming the file, never a `CheckpointError` (for which a cached
    conversion would be rebuilt).
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
        if out_of_resources(error):
            raise OutOfResources(f"out of memory or threads while reading {label} ({first_line(error)})") from None
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


#: The positional tables, the only tensors whose absence is not an error: the variants without them take their
#: context lengths from the dims alone.
POSITIONAL_TABLES = {"encoder.positional_embedding": "n_audio_ctx", "decoder.positional_embedding": "n_text_ctx"}

#: Largest context lengths a file may claim when no tensor of it backs them (a rotary side stores no table), since
#: the model built from them allocates tables of that length (the encoder's sinusoids: n_audio_ctx x n_audio_state;
#: upstream's causal mask: n_text_ctx x n_text_ctx). 16 upstream windows of audio, 9 times upstream's text context.
MAX_UNBACKED_CTX = {"n_audio_ctx": 16 * 1500, "n_text_ctx": 4096}


def check_state_dict(state: object, dims: Dict[str, int], origin: str, complete: bool = True) -> None:
    """Refuse tensors that do not fit ``dims`` (checked with `check_dims`), before a model of those dims exists.

    In order, cheapest first: a dict of dense floating-point (or bool) tensors by name; each tensor's elements
    distinct places within its own storage, and no two tensors sharing elements (an expanded, stride-0 or
    overlapping view could claim any size: see `check_storage`); one ``<side>.blocks.N`` group per layer the dims
    claim; every upstream tensor present with the shape the dims give it; every upstream tensor but the positional
    tables present (they back every dim but the context lengths), a context length no table backs at most
    `MAX_UNBACKED_CTX`; every value finite. complete: also require exactly upstream's names, positional tables
    included (importers and exporters); without it, scheme-specific tensors are left to
    `whisper_rope.weights.loading.adapt_state_dict`.
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
    check_storage(state, origin)
    _check_layers(state, dims, origin)
    expected = upstream_shapes(dims)
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{origin}: tensor {key!r} has shape {tuple(state[key].shape)}, the model's dims expect {shape}"
            )
    _check_names(state, expected, dims, origin, complete)
    _check_finite(state, origin)


def _check_names(
    state: Dict[str, Tensor], expected: Dict[str, Tuple[int, ...]], dims: Dict[str, int], origin: str, complete: bool
) -> None:
    """Every tensor Whisper needs is there (with ``complete``, nothing else is); a context length that no
    positional table backs is at most `MAX_UNBACKED_CTX`."""
    missing = sorted(set(expected) - set(state) - (set() if complete else set(POSITIONAL_TABLES)))
    if missing:
        raise CheckpointError(f"{origin} lacks tensor {missing[0]!r} (and {len(missing) - 1} more) that Whisper needs")
    if complete:
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise CheckpointError(f"{origin} has tensor {unexpected[0]!r}, which upstream Whisper does not have")
    for table, key in POSITIONAL_TABLES.items():
        if table not in state and dims[key] > MAX_UNBACKED_CTX[key]:
            raise CheckpointError(
                f"{origin} dims: {key} is {dims[key]}, but no {table} backs it; at most {MAX_UNBACKED_CTX[key]} "
                "positions are built for a context no tensor holds"
            )


def check_storage(state: Dict[str, Tensor], origin: str, shared: bool = False) -> None:
    """Refuse a tensor whose elements overlap (an expanded, stride-0 or ``as_strided`` view) or reach past its
    storage, and (unless ``shared``) two tensors holding the same elements: otherwise a small file can claim a
    tensor, and so a model, of any size. A slice or a transposed view of a larger storage is fine."""
    spans: Dict[int, list] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        start = tensor.storage_offset()
        end = start + sum(st * (n - 1) for st, n in zip(tensor.stride(), tensor.shape)) + 1  # one past the last
        if not _distinct_elements(tensor) or end * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise CheckpointError(
                f"{origin}: tensor {name!r} claims shape {tuple(tensor.shape)} with strides {tuple(tensor.stride())} "
                f"over a storage of {tensor.untyped_storage().nbytes()} bytes, so its elements overlap or lie past "
                "the storage; expected a dense tensor"
            )
        size = tensor.element_size()
        spans.setdefault(tensor.untyped_storage().data_ptr(), []).append((start * size, end * size, name))
    if shared:
        return
    for ranges in spans.values():
        ranges.sort()
        for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
            if start < end:
                raise CheckpointError(
                    f"{origin}: tensors {first!r} and {second!r} share elements; expected each tensor to own its own"
                )


def _distinct_elements(tensor: Tensor) -> bool:
    """Whether no two indices of ``tensor`` address the same element: taken by increasing stride, each dimension's
    stride passes the whole extent of the ones before it (true of contiguous tensors, slices and transposes)."""
    extent = 0  # offset of the last element the smaller-stride dimensions reach
    for stride, size in sorted((st, n) for st, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride <= extent:
            return False
        extent += stride * (size - 1)
    return True


def _check_finite(state: Dict[str, Tensor], origin: str) -> None:
    """Refuse NaN or infinite weights, which would make every output NaN and be blamed on the input."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{origin}: tensor {name!r} holds {count} NaN or infinite values; expected finite weights"
            )


def _check_layers(state: Dict[str, Tensor], dims: Dict[str, int], origin: str) -> None:
    """One ``<side>.blocks.N`` group for each N below the claimed layer count, and no other: compared without
    building the claimed range, so that a claim of 10**18 layers costs nothing."""
    present: Dict[str, set] = {"encoder": set(), "decoder": set()}
    for key in state:
        match = _BLOCK.match(key)
        if match:
            present[match.group(1)].add(int(match.group(2)))
    for side, field_name in (("encoder", "n_audio_layer"), ("decoder", "n_text_layer")):
        found, claimed = present[side], dims[field_name]
        if len(found) != claimed or (found and max(found) != claimed - 1):
            raise CheckpointError(
                f"{origin}: dims say {claimed} {side} layers ({field_name}), its tensors hold {len(found)} "
                f"({side}.blocks.N for N in {_ranges(found)})"
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


def alignment_mask(pairs: object, n_layer: int, n_head: int, origin: str) -> torch.Tensor:
    """Turn a list of ``[layer, head]`` pairs into a bool mask of shape (n_layer, n_head) (the CTranslate2 and
    Hugging Face configs' alignment heads, and a checkpoint's given that way)."""
    mask = torch.zeros(n_layer, n_head, dtype=torch.bool)
    if not isinstance(pairs, (list, tuple)):
        raise CheckpointError(f"{origin}: alignment_heads is {type(pairs).__name__}, expected a list of [layer, head].")
    for pair in pairs:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            or not (0 <= pair[0] < n_layer and 0 <= pair[1] < n_head)
        ):
            raise CheckpointError(
                f"{origin}: alignment head {pair!r} is not a [layer, head] pair within "
                f"{n_layer} layers x {n_head} heads."
            )
        mask[pair[0], pair[1]] = True
    return mask


def validate_checkpoint(checkpoint: object, label: str) -> dict:
    """Check the layout every reader relies on (`check_dims`, `check_state_dict` without ``complete``, the variant,
    `check_rotary_options`, the alignment heads); raise CheckpointError naming what is wrong.

    Returns the checkpoint as readers use it: ``dims`` upstream's ten fields (the `VARIANT_MARKER` taken out and
    kept as ``variant``), ``alignment_heads`` a bool tensor or upstream's encoded bytes (``[layer, head]`` pairs,
    as CTranslate2 and Hugging Face write them, become the tensor), other entries as stored.
    """
    origin = f"checkpoint {label!r}"
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"{origin} is not a Whisper checkpoint: expected a dict with 'dims' and 'model_state_dict'"
        )
    stored = checkpoint["dims"]
    marker = stored.get(VARIANT_MARKER) if isinstance(stored, dict) else None
    if marker is not None:
        stored = {k: v for k, v in stored.items() if k != VARIANT_MARKER}
    dims = check_dims(stored, origin)
    checked = {**checkpoint, "dims": dims}
    variant = _stored_variant(checkpoint.get("variant"), marker, origin)
    if variant is not None:
        checked["variant"] = variant
    check_state_dict(checkpoint["model_state_dict"], dims, origin, complete=False)
    check_rotary_options(checkpoint.get("rotary"), dims, origin)
    heads = checkpoint.get("alignment_heads")
    if isinstance(heads, (list, tuple)):
        checked["alignment_heads"] = alignment_mask(heads, dims["n_text_layer"], dims["n_text_head"], origin)
    elif heads is not None and not isinstance(heads, (bytes, Tensor)):
        raise CheckpointError(
            f"{origin} has invalid 'alignment_heads': expected a bool tensor (layers, heads), [layer, head] pairs "
            f"or upstream's encoded bytes, got {type(heads).__name__}"
        )
    return checked


def _stored_variant(variant: object, marker: object, origin: str) -> Optional[str]:
    """The checkpoint's variant name: its ``variant`` entry and the dims' marker, which must be strings and agree
    (None: neither is there, an upstream file). Whether the name is a known variant is for `parse_variant`, where the
    model is built."""
    names = []
    for where, value in (("'variant'", variant), (f"dims' {VARIANT_MARKER!r}", marker)):
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{origin} has a non-string {where}: {one_line(repr(value), 40)}")
        if value is not None:
            names.append(value)
    if len(set(names)) > 1:
        raise CheckpointError(f"{origin} names two variants: 'variant' {names[0]!r}, {VARIANT_MARKER} {names[1]!r}")
    return names[0] if names else None


def check_rotary_options(options: object, dims: Dict[str, int], origin: str) -> Dict[str, object]:
    """The checkpoint's ``rotary`` entry (``{}`` when absent), after checking each option it holds against
    `_ROTARY_OPTIONS`. Options of later versions are left alone."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise CheckpointError(f"{origin} has an invalid 'rotary' entry: expected a dict, got {type(options).__name__}")
    for key, value in options.items():
        if key in _ROTARY_OPTIONS:
            expected, valid = _ROTARY_OPTIONS[key]
            if not valid(value, dims):
                raise CheckpointError(
                    f"{origin}: rotary.{key} is {one_line(repr(value), 60)}, expected {expected.format(**dims)}"
                )
    return options


def real_number(value: object) -> bool:
    """Whether ``value`` is an int or float, not a bool (NaN fails every comparison, so range checks refuse it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flag(value: object, dims: Dict[str, int]) -> bool:
    return isinstance(value, bool)


def _seconds_range(value: object, dims: Dict[str, int]) -> bool:
    """[shortest, longest] window seconds, 0 < shortest <= longest, both finite."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(real_number(v) and math.isfinite(v) for v in value)
        and 0 < value[0] <= value[1]
    )


#: Stored rotary option -> (what it must be, for messages; its check given the dims).
_ROTARY_OPTIONS = {
    "adapted_seconds": ("[shortest, longest] finite seconds, 0 < shortest <= longest", _seconds_range),
    "theta": (str(ROTARY_THETA), lambda value, dims: ROTARY_THETA.accepts(value)),
    "gated": ("true or false", _flag),
    "unpadded": ("true or false", _flag),
    "unpadded_margin": (
        "an integer in 0..{n_audio_ctx}",
        lambda value, dims: (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= dims["n_audio_ctx"]
        ),
    ),
    "eot_penalty": (
        str(EOT_PENALTY) + " nats",
        lambda value, dims: EOT_PENALTY.accepts(value),
    ),
    "table_scale": (
        "[encoder, decoder] numbers in [0, 1]",
        lambda value, dims: (
            isinstance(value, (list, tuple)) and len(value) == 2 and all(real_number(x) and 0 <= x <= 1 for x in value)
        ),
    ),
}
