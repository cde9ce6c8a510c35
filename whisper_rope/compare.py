"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.evaluation.compare`."""

from whisper_rope.evaluation.compare import *  # noqa: F403
