"""Batched decoding: each clip of an unpadded batch decodes as if alone."""

import pytest
import torch
import whisper
import whisper.decoding

from whisper_rope.compute_type import quantize_int8
from whisper_rope.decoding import task as decoding
from whisper_rope.features import real_frame_counts

from ..speech_helpers import first_window, random_rotary


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


@pytest.mark.parametrize("unpadded", [False, True])
def test_int8_prompt_step_computes_only_the_logits_the_loop_reads(speech, monkeypatch, unpadded):
    """With a prompt (the previous window's text), the first step of int8 decoding projects only the
    start-of-transcript position and the last one onto the vocabulary, per beam; the results are bit for bit those of
    projecting every position."""
    model = quantize_int8(random_rotary(n_text_ctx=448, n_vocab=51865))  # multilingual: sot, language, task
    model.unpadded = unpadded
    windows = torch.stack([first_window(audio) for audio in speech[:2]])
    options = whisper.DecodingOptions(
        language="en", beam_size=3, sample_len=8, fp16=False, prompt=list(range(220, 260))
    )
    rows = []
    hook = model.decoder.output_projection.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[:2]))
    narrow = model.decode(windows, options)
    hook.remove()
    assert rows[0] == (2 * 3, 2)  # 2 clips x 3 beams; of 44 positions, start of transcript's and the last
    assert all(shape[1] == 1 for shape in rows[1:])
    monkeypatch.setattr(decoding.ClipMaskedInference, "_reads_few_positions", lambda self, tokens: False)
    full = model.decode(windows, options)
    for a, b in zip(narrow, full):
        assert a.tokens == b.tokens and len(a.tokens) > 0
        assert (a.avg_logprob, a.no_speech_prob, a.temperature) == (b.avg_logprob, b.no_speech_prob, b.temperature)
