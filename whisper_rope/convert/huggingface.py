"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.weights.huggingface`."""

from whisper_rope.errors import one_line
from whisper_rope.weights.huggingface import *  # noqa: F403

exception_text = one_line
