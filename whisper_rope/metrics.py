"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.evaluation.metrics`."""

from whisper_rope.evaluation.metrics import *  # noqa: F403
