"""A whole recording in one window: an encoder without an absolute table reads up to `MAX_SINGLE_SECONDS` at once.

Upstream's encoder adds a 1500-position table, so it reads 30 s at a time and a longer recording goes through its
window-by-window loop. An encoder that adds no table (``rotary/...``, or a transplant whose table is annealed to
0) takes any number of frames, and its RoPE tables grow past 1500 positions (`positional.RotaryEmbedding`). So a
45-60-s recording is encoded whole, from its own frames (unpadded, cut as training's windows are cut:
`features.unpadded_features`), and decoded once with upstream's decoding (`WhisperRope.decode`), without
timestamps. The decoder's context (448 tokens for every released model) bounds the text, not the audio:
`MAX_SINGLE_SECONDS` keeps a window's text well inside it (English speech runs at about 3 tokens a second).

A model that adds a table is refused in one line (`check_single_window`): the table positions at most 30 s.
"""

import math
import os
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from whisper.audio import CHUNK_LENGTH, SAMPLE_RATE
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import Whisper

from ..adapted_lengths import warn_outside
from ..audio import load_audio
from ..features import unpadded_features
from ..model import WhisperRope

#: The longest recording read in one window (seconds): two 30-s windows' text fits the 448-token decoder context.
MAX_SINGLE_SECONDS = 60.0
#: The default decoding options of a single window: upstream's greedy decoding, text only.
SINGLE_WINDOW_DECODING = DecodingOptions(without_timestamps=True)


def single_window_refusal(model: Whisper) -> Optional[str]:
    """Why ``model`` cannot read a recording over 30 s in one window; None when it can (no table is added)."""
    if not isinstance(model, WhisperRope):
        return "upstream's encoder adds a 1500-position table, which positions 30 s at most"
    if model.encoder.adds_table:
        return (
            f"variant {model.variant!r} adds a {model.dims.n_audio_ctx}-position table to the encoder, which "
            "positions one 30-s window at most (use loop or batched, or a rotary encoder)"
        )
    return None


def check_single_window(model: Whisper, option: str = "long_form 'single'") -> None:
    """Raise a one-line ValueError naming ``option`` when ``model`` adds an absolute table to its encoder."""
    reason = single_window_refusal(model)
    if reason is not None:
        raise ValueError(f"{option} needs an encoder without an absolute table: {reason}")


def single_window_mel(model: WhisperRope, audio: np.ndarray, max_seconds: float = MAX_SINGLE_SECONDS) -> Tensor:
    """The whole recording's log-mel, unpadded: (n_mels, n_frames), 100 frames a second (even), on the CPU.

    audio: (n_samples,) float32 at 16 kHz. Raises ValueError for audio longer than ``max_seconds``.
    """
    seconds = len(audio) / SAMPLE_RATE
    if seconds > max_seconds:
        raise ValueError(f"a single window takes at most {max_seconds:g} s of audio, got {seconds:.1f} s")
    mel, _ = unpadded_features(audio, model.dims.n_mels, model.unpadded_margin, max_samples=None)
    return mel


@torch.no_grad()
def decode_single_window(
    model: WhisperRope,
    audio: "str | os.PathLike | np.ndarray | Tensor",
    options: DecodingOptions = SINGLE_WINDOW_DECODING,
    max_seconds: float = MAX_SINGLE_SECONDS,
) -> DecodingResult:
    """Decode a whole recording (a path, or 16-kHz samples (n_samples,)) in one window: the encoder reads all its
    frames at once (n_frames / 2 audio positions), the decoder writes its text once.

    options: upstream's `DecodingOptions` (default: greedy, without timestamps); without a ``sample_len``, the text
    may have up to half the text context per 30 s of audio (upstream's limit per window), within the context.
    Raises ValueError for a model that adds a table (`check_single_window`) or audio over ``max_seconds``.
    """
    check_single_window(model)
    if isinstance(audio, (str, os.PathLike)):
        audio = load_audio(audio)
    audio = audio.cpu().numpy() if isinstance(audio, Tensor) else np.asarray(audio, dtype=np.float32)
    mel = single_window_mel(model, audio, max_seconds)
    seconds = len(audio) / SAMPLE_RATE
    if options.sample_len is None:
        windows = max(1, math.ceil(seconds / CHUNK_LENGTH))
        options = replace(options, sample_len=model.dims.n_text_ctx // 2 * windows)
    if options.language is None and not model.is_multilingual:
        options = replace(options, language="en")  # as upstream's transcribe: English-only models detect nothing
    if options.fp16 and model.device.type == "cpu":
        options = replace(options, fp16=False)  # as upstream's transcribe: fp16 is not supported on the CPU
    with model.using(unpadded=True):
        warn_outside(model, seconds, whole=True)
        return model.decode(mel.to(model.device), options)
