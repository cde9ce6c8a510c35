"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.training.transplant`."""

from whisper_rope.training.transplant import *  # noqa: F403
