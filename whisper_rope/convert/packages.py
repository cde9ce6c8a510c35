"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.weights.packages`."""

from whisper_rope.weights.packages import *  # noqa: F403
