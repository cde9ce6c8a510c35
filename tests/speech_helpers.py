"""Helpers shared by the tests of unpadded transcription and batched decoding: a small random rotary model that
encodes unpadded, upstream's first window, and a recorder of encoder lengths."""

import numpy as np
import torch
import whisper
import whisper.decoding
from whisper.audio import N_FRAMES, N_SAMPLES

import whisper_rope

from .conftest import randomise_, small_dims


def random_rotary(n_text_ctx: int = 32, n_vocab: int = 51864):
    """A small random `rotary` model with upstream's 1500 audio positions, encoding unpadded."""
    torch.manual_seed(0)
    dims = small_dims(n_audio_ctx=1500, n_text_ctx=n_text_ctx)
    dims.n_vocab = n_vocab
    model = randomise_(whisper_rope.build_model(dims, "rotary")).eval()
    model.unpadded = True
    return model


def first_window(audio: np.ndarray) -> torch.Tensor:
    """The first window exactly as upstream `transcribe` builds it: real frames, then zero frames up to 30 s."""
    mel = whisper.log_mel_spectrogram(audio, padding=N_SAMPLES)
    return whisper.pad_or_trim(mel[:, : mel.shape[-1] - N_FRAMES], N_FRAMES)


class EncoderLengths:
    """Records the number of audio positions of every encoder call."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.encoder.register_forward_hook(lambda _, __, out: self.lengths.append(out.shape[1]))

    def __enter__(self):
        return self.lengths

    def __exit__(self, *_):
        self.handle.remove()
