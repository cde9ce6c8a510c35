"""The end-of-text penalty of a model adapted to unpadded input: exactly its nats off the end-of-text logit when
decoding without timestamps, nothing with timestamps."""

import pytest
import torch
import whisper

from whisper_rope.decoding.end_of_text import EndOfTextPenalty

from ..speech_helpers import first_window, random_rotary

EOT = 50256  # the English-only vocabulary's end of text


def test_the_penalty_lowers_only_the_end_of_text_logit_and_keeps_a_forbidden_end_forbidden():
    logits = torch.tensor([[0.5, 2.0, -1.0], [1.0, float("-inf"), 3.0]])
    EndOfTextPenalty(eot=1, penalty=1.25).apply(logits, torch.zeros(2, 3, dtype=torch.long))
    assert logits.tolist() == [[0.5, 0.75, -1.0], [1.0, float("-inf"), 3.0]]


def _eager(model, nats: float):
    """Make ``model`` end the text ``nats`` more eagerly: its decoder's end-of-text logit raised at every step."""

    def raise_end(module, args, output):
        output[..., EOT] += nats
        return output

    return model.decoder.register_forward_hook(raise_end)


@pytest.mark.parametrize("beam_size", [None, 3])
def test_a_penalty_undoes_exactly_an_eagerness_of_the_same_nats_without_timestamps(speech, beam_size):
    """A model made 8 nats more eager ends after its first token; the same model decoded with an 8-nat penalty gives
    the tokens and log-probabilities of the model as it was. With timestamps the penalty changes nothing."""
    model = random_rotary(n_text_ctx=448)
    windows = torch.stack([first_window(audio) for audio in speech[:3]])
    options = whisper.DecodingOptions(
        language="en", without_timestamps=True, beam_size=beam_size, sample_len=10, fp16=False
    )
    plain = model.decode(windows, options)
    assert all(len(result.tokens) > 1 for result in plain)
    hook = _eager(model, 8.0)
    eager = model.decode(windows, options)
    assert [len(result.tokens) for result in eager] == [1, 1, 1]  # a blank start is forbidden, then it ends
    model.eot_penalty = 8.0
    undone = model.decode(windows, options)
    for before, after in zip(plain, undone):
        assert after.tokens == before.tokens
        assert after.avg_logprob == pytest.approx(before.avg_logprob, abs=1e-5)
    timed = whisper.DecodingOptions(language="en", beam_size=beam_size, sample_len=10, fp16=False)
    with_penalty = model.decode(windows, timed)
    model.eot_penalty = 0.0
    assert [r.tokens for r in with_penalty] == [r.tokens for r in model.decode(windows, timed)]
    hook.remove()


def test_the_penalty_is_a_model_setting_checked_and_stored_only_when_set(dims):
    from whisper_rope import build_model

    model = build_model(dims, "whisper")
    assert model.eot_penalty == 0.0 and "eot_penalty" not in model.rotary_options
    for bad in (-0.5, 20.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="end-of-text penalty must be a finite number from 0 to 20 nats"):
            model.configure(eot_penalty=bad)
    assert model.eot_penalty == 0.0  # a refused change changes nothing
    model.eot_penalty = 1
    assert model.eot_penalty == 1.0 and isinstance(model.eot_penalty, float)
    assert model.rotary_options["eot_penalty"] == 1.0
    with model.using(eot_penalty=0.0):
        assert "eot_penalty" not in model.rotary_options
    assert model.settings.eot_penalty == 1.0
