"""Audio -> log-mel frames, in one place: the 30-s windows, the unpadded cuts, and where padding starts.

Upstream's model sees 30-s windows: the audio padded with silence to 480000 samples (16 kHz), then
``whisper.audio.log_mel_spectrogram`` (10 ms hop: 3000 frames). Upstream's ``transcribe`` instead computes the mel
of the whole file with 30 s of silence appended and zero-pads the last window's mel. An encoder without an absolute
table can take each clip's own frames instead (``unpadded``): `real_frame_counts` finds where a window's audio ends,
for both kinds of padding, and every caller (training data, batched decoding, the encoder) cuts there.

Shapes: audio (n_samples,) float32 at 16 kHz; mel (n_mels, n_frames) or (b, n_mels, n_frames), 100 frames per
second; audio positions (after the encoder's stride-2 conv) ``n_audio = ceil(n_frames / 2)``.
"""

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim

Audio = Union[np.ndarray, Tensor]


def padded_window(audio: Audio, n_mels: int) -> Tensor:
    """Upstream's 30-s window: the audio padded with silence (or cut) to 30 s, then its log-mel, (n_mels, 3000).

    Padding frames sit at the spectrogram's floor, as in every window the pretrained model has seen."""
    return log_mel_spectrogram(pad_or_trim(audio), n_mels=n_mels)


def silence_padded_mel(audio: Audio, n_mels: int) -> Tensor:
    """The log-mel of the audio with 30 s of silence appended, as upstream ``transcribe`` computes it for a file:
    (n_mels, n_audio_frames + 3000)."""
    return log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)


def first_transcription_window(audio: Audio, n_mels: int) -> Tuple[Tensor, int]:
    """The first window of a clip of at most 30 s exactly as upstream ``transcribe`` builds it, and the clip's real
    frames: the clip's own frames of `silence_padded_mel`, zero-padded to (n_mels, 3000)."""
    mel = silence_padded_mel(audio, n_mels)
    n_frames = mel.shape[-1] - N_FRAMES
    return pad_or_trim(mel[:, :n_frames], N_FRAMES), n_frames


def language_window(audio: Audio, n_mels: int) -> Tensor:
    """The first 30 s of `silence_padded_mel`, (n_mels, 3000): what upstream detects the language from."""
    return pad_or_trim(silence_padded_mel(audio, n_mels), N_FRAMES)


def real_frame_counts(mel: Tensor, min_frames: int = 2) -> Tensor:
    """Per clip, the number of leading mel frames that hold audio, for clips padded the way upstream pads them.

    Two kinds of padding end a clip's real frames: digital silence appended before the log-mel is computed (its
    frames sit at the spectrogram's floor, the clip's minimum, identical in every mel bin), and zero frames appended
    to the log-mel (``pad_or_trim``, which is how upstream `transcribe` fills the last window of a file). A clip's
    audio ends after the last frame that is neither. mel: (b, n_mels, n_frames) or (n_mels, n_frames).
    Returns (b,) int64 counts, each even (so that the stride-2 conv reads no padding frame), at least
    ``min_frames`` and at most ``n_frames``.
    """
    mel = mel.reshape(-1, *mel.shape[-2:])
    floor = mel.amin(dim=(-2, -1), keepdim=True)
    padding = (mel == floor).all(dim=1) | (mel == 0).all(dim=1)  # (b, n_frames)
    frame_numbers = torch.arange(1, mel.shape[-1] + 1, device=mel.device)
    n_real = torch.where(padding, 0, frame_numbers).amax(dim=-1)
    return (n_real + n_real % 2).clamp(min_frames, mel.shape[-1])


def holds_audio_end(mel: Tensor) -> Tensor:
    """Per window, whether it holds the end of its audio as upstream ``transcribe`` marks it: zero frames after the
    audio (`pad_or_trim` of a file's last window, and so of every clip up to 30 s), or a window other than 30 s (a
    clip's own frames, a whole recording read at once). A full 30-s window of a file's frames, speech or silence,
    is taken as cut out of a longer recording, whose speech may go on past its end.

    mel: (b, n_mels, n_frames) or (n_mels, n_frames). Returns (b,) bool.
    """
    mel = mel.reshape(-1, *mel.shape[-2:])
    if mel.shape[-1] != N_FRAMES:
        return torch.ones(mel.shape[0], dtype=torch.bool, device=mel.device)
    return (mel[..., -1] == 0).all(dim=-1)


def trailing_padding_start(mel: Tensor, min_frames: int = 2) -> int:
    """Frames to keep so that no clip of a padded batch loses audio: the largest of `real_frame_counts`."""
    return int(real_frame_counts(mel, min_frames).max())


def unpadded_features(
    audio: np.ndarray, n_mels: int, margin: int = 0, max_samples: Optional[int] = N_SAMPLES
) -> Tuple[Tensor, int]:
    """A clip's log-mel as unpadded transcription feeds it: (n_mels, frames) and frames, with ``margin`` audio
    positions (2 frames each) of the padding kept after the clip's real frames. ``max_samples`` bounds the padded
    audio (one 30-s window); None takes the whole clip, however long (a table-free encoder's single window).

    Transcription pads the audio with silence and cuts the mel where `real_frame_counts` finds the padding, so a
    clip's own trailing digital silence (often 0.3-0.5 s in TTS output) is dropped with it: it cannot be told apart
    from the padding. Training must cut the same way: a model trained on clips with that silence misreads clips
    that arrive without it (docs/results.md). One second of padding gives the same frames as the 30-s window at a
    tenth of its cost.
    """
    length = len(audio) + SAMPLE_RATE + 2 * margin * HOP_LENGTH
    padded = pad_or_trim(audio, length if max_samples is None else min(length, max_samples))
    mel = log_mel_spectrogram(padded, n_mels=n_mels)
    frames = min(int(real_frame_counts(mel)) + 2 * margin, mel.shape[-1])
    return mel[:, :frames], frames


def cut_trailing_padding(mel: Tensor, margin: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
    """Cut a padded batch to its longest clip (see `real_frame_counts`) plus ``margin`` audio positions (2 frames
    each) of the padding after each clip.

    mel: (b, n_mels, n_frames). Returns the cut mel and, when its clips differ in length, their (b,) frame counts
    (to be passed to the encoder as ``n_frames``, so that each clip is encoded as if alone); None when they agree.
    """
    counts = (real_frame_counts(mel) + 2 * margin).clamp(max=mel.shape[-1])
    n_keep = int(counts.max())
    return mel[..., :n_keep], (counts if int(counts.min()) < n_keep else None)


def audio_position_mask(n_frames: Optional[Tensor], n_audio: int, device: torch.device) -> Optional[Tensor]:
    """(b,) real mel frames -> (b, n_audio) bool, True for audio positions that hold real frames."""
    if n_frames is None:
        return None
    real_positions = (n_frames.to(device) + 1) // 2
    return torch.arange(n_audio, device=device)[None, :] < real_positions[:, None]
