"""Batched decoding: each clip of an unpadded batch decodes as if alone."""

import pytest
import torch
import whisper
import whisper.decoding

from whisper_rope.compute_type import quantize_int8
from whisper_rope.features import real_frame_counts

from .speech_helpers import first_window, random_rotary


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
@pytest.mark.parametrize("beam_size", [None, 3])
def test_unpadded_batch_decodes_each_clip_as_if_alone(speech, beam_size, compute_type):
    model = random_rotary(n_text_ctx=448)
    if compute_type == "int8":  # each clip encoded alone at its own frames, activations scaled per row
        model = quantize_int8(model)
    windows = torch.stack([first_window(audio) for audio in speech[:4]])
    assert len(set(real_frame_counts(windows).tolist())) > 1  # the clips differ in length
    options = whisper.DecodingOptions(language="en", beam_size=beam_size, sample_len=12, fp16=False)
    batched = model.decode(windows, options)
    for window, result in zip(windows, batched):
        alone = model.decode(window, options)
        assert result.tokens == alone.tokens and len(alone.tokens) > 0
        assert result.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
        assert result.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-5)


def test_unpadded_batch_detects_each_clips_language(speech):
    model = random_rotary(n_vocab=51865)  # a multilingual vocabulary
    windows = torch.stack([first_window(audio) for audio in speech[:3]])
    options = whisper.DecodingOptions(sample_len=4, fp16=False)
    batched = model.decode(windows, options)
    for window, result in zip(windows, batched):
        alone = model.decode(window, options)
        assert result.language == alone.language and result.tokens == alone.tokens
