"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.weights.ctranslate2`."""

from whisper_rope.weights.ctranslate2 import *  # noqa: F403
