"""whisper_rope: OpenAI Whisper with pluggable positional embeddings, loading pretrained checkpoints.

Public API::

    load_model(name_or_path, variant=None, device=None, ...)   pretrained or fine-tuned weights into a variant
    build_model(dims, variant)                                   a randomly initialised model
    save_checkpoint(model, path)                                 our checkpoint format, written atomically
    available_variants()                                         the preset names
"""

from . import errors
from .errors import AudioError, CheckpointError, ModelNotFoundError, VariantError, WhisperRopeError
from .evaluation.evaluate import EvaluationOptions, EvaluationResult, evaluate
from .model import WhisperRope
from .variants import available_variants, parse_variant
from .version import __version__
from .weights.loading import LoadReport, build_model, load_model, save_checkpoint

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
