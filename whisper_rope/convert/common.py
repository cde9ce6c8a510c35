"""Kept for one release so that old imports keep working: this module moved to `whisper_rope.weights.common`
and `whisper_rope.weights.format`."""

from whisper_rope.errors import one_line
from whisper_rope.weights.common import *  # noqa: F403
from whisper_rope.weights.format import *  # noqa: F403

exception_text = one_line
