"""Pieces shared by the checkpoint importers and exporters.

Everything here speaks *upstream* Whisper names (``encoder.blocks.0.attn.query.weight`` ...), the common language
between the CTranslate2 importer, the Hugging Face importer/exporter and ``whisper.model.Whisper``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

from whisper_rope.errors import CheckpointError, PathLike, one_line
from whisper_rope.fs.atomic import atomic_torch_save
from whisper_rope.fs.files import read_regular
from whisper_rope.variants import UPSTREAM_VARIANT


def read_json_object(path: Path, what: str) -> Dict[str, Any]:
    """The JSON object in ``path``; a CheckpointError naming ``what`` and the file when it is not a regular file
    (a FIFO never blocks the reader), is unreadable or is not an object (a list, a number)."""
    raw = read_regular(path, what, CheckpointError)
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{what} {path} is not readable JSON: {one_line(exc)}.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a {type(data).__name__}, expected a JSON object.")
    return data


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
        input_options: whisper_rope's input settings the source carried (``unpadded``, ``unpadded_margin``: how the
            model was fine-tuned to be fed; ``eot_penalty``: how it is to be decoded), which loading restores; empty
            for upstream's padded input.
    """

    dims: Dict[str, int]
    state_dict: Dict[str, torch.Tensor]
    alignment_heads: Optional[torch.Tensor]
    source: str
    extra: Dict[str, Any] = field(default_factory=dict)
    input_options: Dict[str, Any] = field(default_factory=dict)

    def to_upstream(self) -> Dict[str, Any]:
        """The checkpoint dict ``whisper.load_model`` reads: ``{"dims", "model_state_dict"[, "alignment_heads"]}``,
        and with input options our ``variant`` (upstream's) and ``rotary`` entries that carry them (upstream's
        loader ignores both)."""
        checkpoint: Dict[str, Any] = {"dims": dict(self.dims), "model_state_dict": self.state_dict}
        if self.alignment_heads is not None:
            checkpoint["alignment_heads"] = self.alignment_heads
        if self.input_options:
            checkpoint.update(variant=UPSTREAM_VARIANT, rotary=dict(self.input_options))
        return checkpoint


def alignment_pairs(mask: torch.Tensor) -> list:
    """Inverse of `whisper_rope.weights.format.alignment_mask`: a bool (n_layer, n_head) tensor to a sorted list
    of [layer, head]."""
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
    return atomic_torch_save(payload, path)


def describe_paths(paths: Sequence[Path]) -> str:
    """``a/model.bin`` or ``a/model.bin.part1 + b/model.bin.part2`` for messages."""
    return " + ".join(str(p) for p in paths)
