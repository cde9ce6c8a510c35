"""whisper_rope: OpenAI Whisper with pluggable positional embeddings, loading pretrained checkpoints.

Public API::

    load_model(name_or_path, variant=None, device=None, ...)   pretrained or fine-tuned weights into a variant
    build_model(dims, variant)                                   a randomly initialised model
    save_checkpoint(model, path)                                 our checkpoint format, written atomically
    available_variants()                                         the preset names
"""

__version__ = "0.1.0"

from .checkpoint import LoadReport, build_model, load_model, save_checkpoint
from .evaluate import EvaluationOptions, EvaluationResult, evaluate
from .errors import AudioError, CheckpointError, ModelNotFoundError, VariantError, WhisperRopeError
from .model import WhisperRope
from .variants import available_variants, parse_variant

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
    "available_variants",
    "build_model",
    "evaluate",
    "load_model",
    "parse_variant",
    "save_checkpoint",
]
