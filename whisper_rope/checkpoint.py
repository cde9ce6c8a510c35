"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.weights.format`
and `whisper_rope.weights.loading`."""

from whisper_rope.weights.format import *  # noqa: F403
from whisper_rope.weights.loading import *  # noqa: F403
