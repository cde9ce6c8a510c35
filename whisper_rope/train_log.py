"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.training.log`."""

from whisper_rope.training.log import *  # noqa: F403
