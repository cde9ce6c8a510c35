"""Converting checkpoints between upstream ``.pt``, CTranslate2 (faster-whisper) and Hugging Face formats (`convert`,
which the ``whisper-rope convert`` command runs).

CTranslate2 or Hugging Face directory -> upstream ``.pt``, and upstream ``.pt`` (the ``whisper`` variant only) ->
Hugging Face directory. Everything is expressed in upstream Whisper tensor names; see `ImportedCheckpoint`.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import torch
import whisper

from whisper_rope.errors import CheckpointError, ModelNotFoundError, PathLike, VariantError
from whisper_rope.fs.outputs import refuse_overlap
from whisper_rope.variants import UPSTREAM_VARIANT, parse_variant
from whisper_rope.weights.common import ImportedCheckpoint, save_upstream
from whisper_rope.weights.ctranslate2 import is_ctranslate2_dir, read_ctranslate2
from whisper_rope.weights.format import check_state_dict, read_checkpoint
from whisper_rope.weights.huggingface import (
    EXPORT_FILES,
    INPUT_OPTIONS,
    is_huggingface_dir,
    read_huggingface,
    write_huggingface,
)
from whisper_rope.weights.loading import load_model


def convert(src: PathLike, dst: PathLike, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert a checkpoint, choosing the direction from ``src``.

    * a CTranslate2 directory (or model.bin) or a Hugging Face directory -> upstream-format ``dst`` ending in
      ``.pt`` (tensors keep the source's float type);
    * an upstream-format ``.pt`` (``{"dims", "model_state_dict"}``, optionally ``variant``, ``rotary``,
      ``alignment_heads``) -> Hugging Face directory ``dst``;
    * a model name (``tiny.en`` ... ``large-v3-turbo``, found as `load_model` finds it) -> either, by ``dst``'s
      suffix (``.pt``: upstream's format).

    Args:
        src: the checkpoint to read, or a model name.
        dst: the file or directory to create; written atomically.
        progress: show a progress bar where the reader has one.
        overwrite: replace an existing ``dst`` that convert wrote (see `check_destination`) instead of refusing.

    Returns:
        ``dst`` as a Path.

    Raises:
        CheckpointError: unreadable source, a rotary variant headed for Hugging Face, or a bad destination.
        ModelNotFoundError: ``src`` does not exist and is not a model name, or the named model's weights are not
            found.
        OutputError: ``dst`` is or holds ``src``.
    """
    src, dst = Path(src), Path(dst)
    named = not src.exists() and os.fspath(src) in whisper.available_models()
    if not src.exists() and not named:
        raise ModelNotFoundError(f"Checkpoint {src} does not exist, and is not a model name.")
    check_destination(src, dst, overwrite)
    if named:
        return _named_model(os.fspath(src), dst, overwrite, progress)
    if src.is_dir() or src.name.startswith("model.bin"):
        return _foreign_to_upstream(src, dst, progress)
    return _upstream_to_huggingface(src, dst, overwrite)


def _named_model(name: str, dst: Path, overwrite: bool, progress: bool) -> Path:
    """A model name, found as `load_model` finds it (upstream's cache, an installed model package, upstream's
    download) -> an upstream-format ``.pt`` (``dst`` ending in .pt) or a Hugging Face directory."""
    model = load_model(name, device="cpu", progress=progress)
    heads = model.alignment_heads.to_dense()
    imported = ImportedCheckpoint(asdict(model.dims), model.state_dict(), heads, name)
    if dst.suffix == ".pt":
        return save_upstream(imported, dst)
    return write_huggingface(imported.dims, imported.state_dict, dst, alignment_heads=heads, overwrite=overwrite)


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a ``dst`` that is or holds ``src``, and an existing ``dst``
    unless ``overwrite`` is given and ``dst`` is what convert writes: a PyTorch checkpoint file, or a directory of
    nothing but a Hugging Face export's files. ``--force`` never replaces anything else."""
    refuse_overlap(dst, {"source": src}, "destination")
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return
    if not overwrite:
        raise CheckpointError(
            f"destination {dst} already exists; pass overwrite=True (whisper-rope convert --force) to replace it"
        )
    if dst.is_dir():
        foreign = sorted(entry.name for entry in dst.iterdir() if entry.name not in EXPORT_FILES)
        if foreign:
            raise CheckpointError(
                f"destination {dst} holds files that are not a Hugging Face export ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); --force replaces only an earlier export"
            )
    elif not _is_torch_file(dst):
        raise CheckpointError(
            f"destination {dst} is not a PyTorch checkpoint; --force replaces only a checkpoint (torch.save's zip "
            "format), never another file"
        )


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` is a regular file in torch.save's zip format (a ``.../data.pkl`` record), read from its
    central directory only."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


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
    checkpoint = read_checkpoint(src, mmap=True)
    _check_portable(checkpoint, src)
    dims = dict(checkpoint["dims"])
    state_dict = checkpoint["model_state_dict"]
    check_state_dict(state_dict, dims, f"checkpoint {str(src)!r}")  # exactly upstream's tensors, nothing else
    alignment = checkpoint.get("alignment_heads")
    if alignment is not None and not isinstance(alignment, torch.Tensor):
        raise CheckpointError(f"Checkpoint {src}: alignment_heads is {type(alignment).__name__}, expected a tensor.")
    return write_huggingface(
        dims, state_dict, dst, alignment_heads=alignment, overwrite=overwrite, input_options=_input_options(checkpoint)
    )


def _input_options(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The input settings of a model fine-tuned for unpadded input, which the export keeps in its config.json; {}
    for upstream's padded input."""
    stored = checkpoint.get("rotary") or {}
    if not any(stored.get(key) for key in INPUT_OPTIONS):
        return {}
    return {key: stored[key] for key in INPUT_OPTIONS if key in stored}


def _check_portable(checkpoint: Dict[str, Any], src: Path) -> None:
    """Refuse checkpoints whose positional variant is not upstream Whisper's ``sinusoidal/learned``.

    A checkpoint without a ``variant`` entry is upstream's own format, unless it carries rotary settings.
    """
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
    if variant.name != UPSTREAM_VARIANT:
        raise CheckpointError(
            f"Checkpoint {src} uses the {variant.name} positional variant; only upstream Whisper's "
            f"{UPSTREAM_VARIANT} can be represented in the Hugging Face format."
        )
