"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.training.distributed`."""

from whisper_rope.training.distributed import *  # noqa: F403
