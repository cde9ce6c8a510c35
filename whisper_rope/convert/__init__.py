"""Checkpoint conversion between upstream Whisper, CTranslate2 (faster-whisper) and Hugging Face formats.

* :func:`read_ctranslate2` / :func:`is_ctranslate2_dir` - import faster-whisper model directories.
* :func:`read_huggingface` / :func:`write_huggingface` / :func:`is_huggingface_dir` - Hugging Face Whisper.
* :func:`find_installed_model` / :func:`installed_model_names` / :func:`cached_conversion` - models shipped in
  installed Python packages, converted once into the cache.
* :func:`convert` - the ``convert`` command: CTranslate2 or Hugging Face directory -> upstream ``.pt``, and
  upstream ``.pt`` -> Hugging Face directory.

Everything is expressed in upstream Whisper tensor names; see :class:`ImportedCheckpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from whisper_rope.convert.common import (
    ImportedCheckpoint,
    PathLike,
    check_dims,
    check_state_dict,
    save_upstream,
    upstream_shapes,
)
from whisper_rope.convert.ctranslate2 import is_ctranslate2_dir, read_ctranslate2
from whisper_rope.convert.huggingface import is_huggingface_dir, read_huggingface, write_huggingface
from whisper_rope.convert.packages import (
    InstalledModel,
    cached_conversion,
    find_installed_model,
    installed_model_names,
    resolve_cache_dir,
)
from whisper_rope.errors import CheckpointError, ModelNotFoundError

__all__ = [
    "ImportedCheckpoint",
    "InstalledModel",
    "cached_conversion",
    "convert",
    "find_installed_model",
    "installed_model_names",
    "is_ctranslate2_dir",
    "is_huggingface_dir",
    "read_ctranslate2",
    "read_huggingface",
    "resolve_cache_dir",
    "save_upstream",
    "upstream_shapes",
    "write_huggingface",
]

# The one positional variant whose tensors and maths are exactly upstream Whisper's (preset ``whisper``).
PORTABLE_VARIANT = "sinusoidal/learned"


def convert(src: PathLike, dst: PathLike, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert a checkpoint, choosing the direction from ``src``.

    * a CTranslate2 directory (or model.bin) or a Hugging Face directory -> upstream-format ``dst`` ending in
      ``.pt`` (tensors keep the source's float type);
    * an upstream-format ``.pt`` (``{"dims", "model_state_dict"}``, optionally ``variant``, ``rotary``,
      ``alignment_heads``) -> Hugging Face directory ``dst``.

    Args:
        src: the checkpoint to read.
        dst: the file or directory to create; written atomically.
        progress: show a progress bar where the reader has one.
        overwrite: replace an existing ``dst`` instead of refusing.

    Returns:
        ``dst`` as a Path.

    Raises:
        CheckpointError: unreadable source, a rotary variant headed for Hugging Face, or a bad destination.
        ModelNotFoundError: ``src`` does not exist.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ModelNotFoundError(f"Checkpoint {src} does not exist.")
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise CheckpointError(f"destination {dst} already exists; pass overwrite=True (whisper-rope convert --force) to replace it")
    if src.is_dir() or src.name.startswith("model.bin"):
        return _foreign_to_upstream(src, dst, progress)
    return _upstream_to_huggingface(src, dst, overwrite)


def _foreign_to_upstream(src: Path, dst: Path, progress: bool) -> Path:
    """CTranslate2 or Hugging Face -> upstream ``.pt``."""
    if dst.suffix != ".pt":
        raise CheckpointError(f"Destination {dst} must end in .pt: {src} converts to an upstream Whisper checkpoint.")
    if src.is_file() or is_ctranslate2_dir(src):
        imported = read_ctranslate2(src, progress=progress, dtype=None)
    elif is_huggingface_dir(src):
        imported = read_huggingface(src, dtype=None)
    else:
        raise CheckpointError(
            f"Directory {src} is neither a CTranslate2 model (model.bin + config.json) "
            "nor a Hugging Face Whisper model (config.json + model.safetensors or pytorch_model.bin)."
        )
    return save_upstream(imported, dst)


def _upstream_to_huggingface(src: Path, dst: Path, overwrite: bool) -> Path:
    """Upstream-format ``.pt`` -> Hugging Face directory."""
    if dst.suffix == ".pt":
        raise CheckpointError(f"Destination {dst} should be a directory: {src} converts to the Hugging Face format.")
    checkpoint = load_upstream(src)
    _check_portable(checkpoint, src)
    dims = check_dims(dict(checkpoint["dims"]), f"Checkpoint {src}")
    state_dict = checkpoint["model_state_dict"]
    check_state_dict(state_dict, dims, f"Checkpoint {src}")
    alignment = checkpoint.get("alignment_heads")
    if alignment is not None and not isinstance(alignment, torch.Tensor):
        raise CheckpointError(f"Checkpoint {src}: alignment_heads is {type(alignment).__name__}, expected a tensor.")
    return write_huggingface(dims, state_dict, dst, alignment_heads=alignment, overwrite=overwrite)


def load_upstream(path: Path) -> Dict[str, Any]:
    """An upstream-format checkpoint dict, loaded with ``weights_only=True``: memory-mapped where the file allows it,
    else (legacy non-zip files cannot be mapped) through :func:`whisper_rope.checkpoint.read_checkpoint`, which also
    words every refusal (an unsafe pickle, a truncated file) as the library's loaders do."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy format, or a bad or unsafe pickle: read_checkpoint reads or refuses it in one line
        from whisper_rope.checkpoint import read_checkpoint

        checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(
            f"Checkpoint {path} is not in upstream Whisper format (a dict with dims and model_state_dict)."
        )
    if not isinstance(checkpoint["dims"], dict) or not isinstance(checkpoint["model_state_dict"], dict):
        raise CheckpointError(f"Checkpoint {path}: dims and model_state_dict must both be dicts.")
    return checkpoint


def _check_portable(checkpoint: Dict[str, Any], src: Path) -> None:
    """Refuse checkpoints whose positional variant is not upstream Whisper's ``sinusoidal/learned``.

    A checkpoint without a ``variant`` entry is upstream's own format, unless it carries rotary settings.
    """
    from whisper_rope.errors import VariantError
    from whisper_rope.variants import parse_variant

    stored = checkpoint.get("variant")
    if stored is None:
        if checkpoint.get("rotary"):
            raise CheckpointError(
                f"Checkpoint {src} has rotary settings; rotary variants cannot be represented in the Hugging Face "
                "format, which only has absolute position tables."
            )
        return
    try:
        variant = parse_variant(stored)
    except VariantError as exc:
        raise CheckpointError(f"Checkpoint {src} has an unknown positional variant {stored!r}: {exc}") from None
    if variant.uses_rotary:
        raise CheckpointError(
            f"Checkpoint {src} uses the {variant.name} positional variant; rotary variants cannot be represented "
            "in the Hugging Face format, which only has absolute position tables."
        )
    if variant.name != PORTABLE_VARIANT:
        raise CheckpointError(
            f"Checkpoint {src} uses the {variant.name} positional variant; only upstream Whisper's "
            f"{PORTABLE_VARIANT} can be represented in the Hugging Face format."
        )
