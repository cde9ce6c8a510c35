"""Kept for one release so that old imports keep working: checkpoint conversion moved to `whisper_rope.weights`
(`whisper_rope.weights.convert` for the ``convert`` command, `whisper_rope.weights.ctranslate2`,
`whisper_rope.weights.huggingface` and `whisper_rope.weights.packages` for the readers and writers)."""

from whisper_rope.variants import UPSTREAM_VARIANT
from whisper_rope.weights.common import ImportedCheckpoint, save_upstream
from whisper_rope.weights.convert import convert
from whisper_rope.weights.ctranslate2 import is_ctranslate2_dir, read_ctranslate2
from whisper_rope.weights.format import check_dims, check_state_dict, upstream_shapes
from whisper_rope.weights.format import read_checkpoint as load_upstream
from whisper_rope.weights.huggingface import is_huggingface_dir, read_huggingface, write_huggingface
from whisper_rope.weights.packages import (
    InstalledModel,
    cached_conversion,
    find_installed_model,
    installed_model_names,
    resolve_cache_dir,
)

PORTABLE_VARIANT = UPSTREAM_VARIANT

__all__ = [
    "PORTABLE_VARIANT",
    "ImportedCheckpoint",
    "InstalledModel",
    "cached_conversion",
    "check_dims",
    "check_state_dict",
    "convert",
    "find_installed_model",
    "installed_model_names",
    "is_ctranslate2_dir",
    "is_huggingface_dir",
    "load_upstream",
    "read_ctranslate2",
    "read_huggingface",
    "resolve_cache_dir",
    "save_upstream",
    "upstream_shapes",
    "write_huggingface",
]
