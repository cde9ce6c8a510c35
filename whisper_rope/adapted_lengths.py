"""A warning when an unpadded model is fed input far longer than the windows it was adapted on.

A model adapted to unpadded input learns the lengths of its training windows: adapted on one-sentence clips of
2-6 s, it writes the first sentence of a 20-s window and ends its text. `load_model` restores the range a run
trained on (``WhisperRope.adapted_seconds``, stored with the checkpoint's rotary options); `warn_outside` compares a
window with it and warns once per model, naming the recipe that adapts on windows of every length.

Checkpoints adapted unpadded before the range was recorded (``trained_unpadded`` set, no range) were trained on
single short clips: they are warned about from `UNRECORDED_LIMIT_S` on.
"""

import logging

from whisper.audio import CHUNK_LENGTH

logger = logging.getLogger("whisper_rope")

#: Input (seconds) from which a model adapted before the range was recorded is warned about.
UNRECORDED_LIMIT_S = 10.0


def longest_adapted_window(model) -> "float | None":
    """The longest window ``model`` may take unpadded without a warning; None when any length is fine (not
    unpadded, or not adapted to it at all: `load_model` already warns about that)."""
    if not getattr(model, "unpadded", False):  # upstream's Whisper has no such flag: always padded
        return None
    recorded = getattr(model, "adapted_seconds", None)
    if recorded is None:
        return UNRECORDED_LIMIT_S if getattr(model, "trained_unpadded", False) else None
    return max(1.5 * recorded[1], recorded[1] + 5.0)


def warn_outside(model, seconds: float, what: str = "the input", whole: bool = False) -> bool:
    """Warn (once per model) when ``what``, of ``seconds`` of audio, gives ``model`` longer windows than it was
    adapted on; a recording longer than 30 s counts as its 30-s windows, unless it is read ``whole`` (one window,
    `transcription.single_window`). Returns whether it warned."""
    limit = longest_adapted_window(model)
    window = float(seconds) if whole else min(float(seconds), float(CHUNK_LENGTH))
    if limit is None or window <= limit or getattr(model, "_warned_outside", False):
        return False
    model._warned_outside = True
    recorded = getattr(model, "adapted_seconds", None)
    trained = (
        f"windows of {recorded[0]:.1f}-{recorded[1]:.1f} s"
        if recorded is not None
        else "single short clips (its checkpoint predates recorded window lengths)"
    )
    logger.warning(
        "%s gives this unpadded model %.0f-s windows, but it was adapted on %s: expect dropped speech after the "
        "first sentences; re-run `whisper-rope finetune --recipe unpadded-sliced` (or unpadded-rotary), which "
        "adapts on windows of every length up to 30 s",
        what,
        window,
        trained,
    )
    return True
