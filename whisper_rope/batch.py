"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.transcribe`."""

from whisper_rope.transcribe import *  # noqa: F403
