"""Exception types raised by whisper_rope.

Each error carries one sentence naming the input (file, tensor, option) and what was expected.  They subclass
``ValueError`` so that callers who already catch bad-input errors from numpy/torch keep working, and the CLI turns
any ``WhisperRopeError`` into a one-line message and a non-zero exit.
"""


class WhisperRopeError(Exception):
    """Base class of every error whisper_rope raises on purpose."""


class VariantError(WhisperRopeError, ValueError):
    """An unknown or invalid positional-embedding variant or option."""


class CheckpointError(WhisperRopeError, ValueError):
    """A checkpoint (ours, upstream, CTranslate2 or Hugging Face) that cannot be read or does not fit the model."""


class ModelNotFoundError(WhisperRopeError, FileNotFoundError):
    """A model name or path that resolves to no weights."""


class AudioError(WhisperRopeError, ValueError):
    """An audio file that is missing, empty or cannot be decoded."""


class TrainingError(WhisperRopeError, RuntimeError):
    """Training cannot continue (a non-finite loss, a checkpoint that does not fit this run)."""
