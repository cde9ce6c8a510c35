"""Audio features: real-frame counts and where trailing padding starts."""

import torch
import whisper
import whisper.decoding
from whisper.audio import N_FRAMES, N_SAMPLES

from whisper_rope.features import holds_audio_end, padded_window, real_frame_counts, trailing_padding_start

from .speech_helpers import first_window


def test_real_frame_counts_find_silence_and_zero_padding(speech):
    audio = speech[0]
    n_content = len(audio) // 160
    silence_padded = whisper.log_mel_spectrogram(audio, padding=N_SAMPLES)[:, :N_FRAMES]
    zero_padded = first_window(audio)  # what upstream transcribe gives the model
    counts = real_frame_counts(torch.stack([silence_padded, zero_padded]))
    # The fixture ends in digital silence, which is indistinguishable from padding and is cut too.
    assert counts[0] == counts[1] == real_frame_counts(zero_padded[:, : N_FRAMES // 2])[0]
    assert n_content - 60 <= int(counts[0]) <= n_content and int(counts[0]) % 2 == 0
    assert trailing_padding_start(zero_padded) == int(counts[0])
    full = torch.randn(80, 3000)
    assert trailing_padding_start(full) == 3000


def test_a_window_holds_its_audios_end_when_zero_frames_follow_it_or_it_is_not_30_s(speech):
    padded = first_window(speech[0])  # a clip as upstream transcribe reads it, or a recording's last window
    full = whisper.log_mel_spectrogram(torch.randn(N_SAMPLES) * 0.1)[:, :N_FRAMES]  # cut from a longer recording
    silent_end = padded_window(speech[0], 80)  # a file's own frames that end in silence (a pause of a recording)
    assert holds_audio_end(torch.stack([padded, full, silent_end])).tolist() == [True, False, False]
    assert holds_audio_end(full[:, :1200]).tolist() == [True]  # a clip's own frames: all there is
    assert holds_audio_end(whisper.log_mel_spectrogram(torch.randn(2 * N_SAMPLES) * 0.1)).tolist() == [True]
