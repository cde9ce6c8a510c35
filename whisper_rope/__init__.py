"""whisper_rope: OpenAI Whisper with pluggable positional embeddings, loading pretrained checkpoints.

Every name the README teaches is importable from here; the subpackages, the layers of docs/design.md ("Layout"),
hold the rest: `fs`, `decoding`, `transcription`, `data`, `evaluation`, `weights`, `training`, `experiments`.
Importing the package imports no command-line module (`whisper_rope.cli`).
"""

from .audio import load_audio
from .errors import (
    AudioError,
    CheckpointError,
    DataError,
    ModelNotFoundError,
    OptionError,
    TrainingError,
    VariantError,
    WhisperRopeError,
)
from .evaluation.evaluate import EvaluationOptions, EvaluationResult, evaluate
from .model import WhisperRope
from .training.config import FinetuneConfig
from .training.loop import finetune
from .transcription.longform import transcribe_chunked, transcribe_recordings
from .transcription.single_window import decode_single_window
from .transcription.transcribe import transcribe_many
from .variants import available_variants, parse_variant
from .version import __version__
from .weights.loading import LoadReport, build_model, load_model, save_checkpoint

__all__ = [
    # models: load, build, save
    "load_model", "build_model", "save_checkpoint", "WhisperRope", "LoadReport", "available_variants", "parse_variant",
    # transcription
    "load_audio", "transcribe_many", "transcribe_chunked", "transcribe_recordings", "decode_single_window",
    # fine-tuning and evaluation
    "finetune", "FinetuneConfig", "evaluate", "EvaluationOptions", "EvaluationResult",
    # errors (each a ValueError, FileNotFoundError or RuntimeError too)
    "WhisperRopeError", "AudioError", "CheckpointError", "DataError", "ModelNotFoundError", "OptionError",
    "TrainingError", "VariantError",
    "__version__",
]  # fmt: skip
