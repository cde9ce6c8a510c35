"""Pieces shared by the checkpoint importers and exporters.

Everything here speaks *upstream* Whisper names (``encoder.blocks.0.attn.query.weight`` ...), the common language
between the CTranslate2 importer, the Hugging Face importer/exporter and ``whisper.model.Whisper``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

from whisper_rope.atomic import atomic_write
from whisper_rope.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]

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

# Terminal escape sequences (torch colours parts of its unsafe-pickle explanation) and other control characters.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one readable line for an error message: escape codes dropped, control characters (newlines
    included) turned into spaces, whitespace collapsed, cut to ``limit`` characters."""
    text = _CONTROL.sub(" ", _ANSI_ESCAPE.sub("", str(text)))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exception_text(exc: BaseException, limit: int = 300) -> str:
    """One line describing ``exc``: its message via :func:`one_line`, or its type name when it has none."""
    return one_line(exc, limit) or type(exc).__name__


def read_json_object(path: Path, what: str) -> Dict[str, Any]:
    """The JSON object in ``path``; a CheckpointError naming ``what`` and the file when it is unreadable or not an
    object (a list, a number)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is not readable JSON: {exception_text(exc)}.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a {type(data).__name__}, expected a JSON object.")
    return data


def refused_global(exc: BaseException) -> Optional[str]:
    """The global a weights-only unpickler refused (``builtins.exec``, ``posix.system``, ...), or None.

    torch words the refusal in several ways ("Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module
    x is blocked") inside a long multi-line explanation; both name the global after the word GLOBAL.
    """
    match = re.search(r"GLOBAL\s+([\w.]+)", _ANSI_ESCAPE.sub("", str(exc)))
    return match.group(1) if match else None


UNSAFE_PICKLE = "objects other than tensors and plain data, which weights_only loading does not execute"


# Whisper's vocabularies: the English-only GPT-2 based one has 51864 entries, the multilingual ones 51865 and more
# (upstream's ``Whisper.is_multilingual`` test).
MULTILINGUAL_MIN_VOCAB = 51865


@dataclass
class ImportedCheckpoint:
    """A checkpoint read from a foreign format, expressed in upstream Whisper terms.

    Attributes:
        dims: the ``whisper.model.ModelDimensions`` fields as a plain dict.
        state_dict: upstream-named tensors; loads strictly into ``whisper.model.Whisper(ModelDimensions(**dims))``.
        alignment_heads: bool tensor of shape (n_text_layer, n_text_head) marking the cross-attention heads used for
            word timestamps, or None when the source does not say.
        source: a one-line human description of where the weights came from.
        extra: other facts the source carried (e.g. ``lang_ids``, ``suppress_ids``), for information only.
    """

    dims: Dict[str, int]
    state_dict: Dict[str, torch.Tensor]
    alignment_heads: Optional[torch.Tensor]
    source: str
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_upstream(self) -> Dict[str, Any]:
        """The checkpoint dict ``whisper.load_model`` reads: ``{"dims", "model_state_dict"[, "alignment_heads"]}``."""
        checkpoint: Dict[str, Any] = {"dims": dict(self.dims), "model_state_dict": self.state_dict}
        if self.alignment_heads is not None:
            checkpoint["alignment_heads"] = self.alignment_heads
        return checkpoint


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


def alignment_mask(pairs: Any, n_layer: int, n_head: int, origin: str) -> torch.Tensor:
    """Turn a list of ``[layer, head]`` pairs into a bool mask of shape (n_layer, n_head)."""
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


def alignment_pairs(mask: torch.Tensor) -> list:
    """Inverse of :func:`alignment_mask`: a bool (n_layer, n_head) tensor to a sorted list of [layer, head]."""
    if mask.is_sparse:
        mask = mask.to_dense()
    return [[int(layer), int(head)] for layer, head in torch.nonzero(mask.bool()).tolist()]


def float_dtype_of(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The float dtype to keep when converting "as the source": the narrowest float type present, else float32."""
    present = set(dtypes)
    for candidate in (torch.float16, torch.bfloat16):
        if candidate in present:
            return candidate
    return torch.float32


def save_upstream(checkpoint: ImportedCheckpoint, path: PathLike) -> Path:
    """Write ``checkpoint`` atomically as an upstream-format ``.pt`` file readable by ``whisper.load_model``."""
    payload = checkpoint.to_upstream()
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def describe_paths(paths: Sequence[Path]) -> str:
    """``a/model.bin`` or ``a/model.bin.part1 + b/model.bin.part2`` for messages."""
    return " + ".join(str(p) for p in paths)
