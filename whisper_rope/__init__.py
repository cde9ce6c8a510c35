"""whisper_rope: OpenAI Whisper with pluggable positional embeddings, loading pretrained checkpoints.

Public API::

    load_model(name_or_path, variant=None, device=None, ...)   pretrained or fine-tuned weights into a variant
    build_model(dims, variant)                                   a randomly initialised model
    save_checkpoint(model, path)                                 our checkpoint format, written atomically
    available_variants()                                         the preset names
"""

import importlib
from typing import Any

from . import errors
from .errors import AudioError, CheckpointError, ModelNotFoundError, VariantError, WhisperRopeError
from .model import WhisperRope
from .variants import available_variants, parse_variant
from .version import __version__
from .weights.loading import LoadReport, build_model, load_model, save_checkpoint

# Imported on first use (PEP 562): a process that only transcribes never needs evaluation's modules.
_LAZY = {name: "whisper_rope.evaluation.evaluate" for name in ("EvaluationOptions", "EvaluationResult", "evaluate")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals().setdefault(name, value)  # `import whisper_rope.evaluate` may have bound the name meanwhile
    return globals()[name]


__all__ = [
    "AudioError",
    "CheckpointError",
    "EvaluationOptions",
    "EvaluationResult",
    "LoadReport",
    "ModelNotFoundError",
    "VariantError",
    "WhisperRope",
    "WhisperRopeError",
    "__version__",
    "available_variants",
    "build_model",
    "errors",
    "evaluate",
    "load_model",
    "parse_variant",
    "save_checkpoint",
]
