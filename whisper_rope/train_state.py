"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.training.state`."""

from whisper_rope.training.state import *  # noqa: F403
