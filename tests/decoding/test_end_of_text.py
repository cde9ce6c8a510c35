"""The end-of-text penalty of a model adapted to unpadded input: exactly its nats off the end-of-text logit of each
window that holds the end of its audio (of every window without timestamps), nothing on a full window cut out of a
longer recording and decoded with timestamps, nothing once a row's last timestamp has reached its audio's end."""

import numpy as np
import pytest
import torch
import whisper
from whisper.audio import N_FRAMES

from whisper_rope.decoding import end_of_text
from whisper_rope.decoding.end_of_text import EndOfTextPenalty
from whisper_rope.features import holds_audio_end, real_frame_counts

from ..speech_helpers import first_window, random_rotary

EOT = 50256  # the English-only vocabulary's end of text


def test_the_penalty_lowers_only_the_end_of_text_logit_of_its_rows_and_keeps_a_forbidden_end_forbidden():
    logits = torch.tensor([[0.5, 2.0, -1.0], [1.0, float("-inf"), 3.0], [0.0, 1.0, 0.0]])
    penalty = EndOfTextPenalty(eot=1, penalty=1.25)
    tokens = torch.arange(9).reshape(3, 3)  # no row repeats itself
    penalty.apply(logits, tokens)
    assert logits.tolist() == [[0.5, 0.75, -1.0], [1.0, float("-inf"), 3.0], [0.0, -0.25, 0.0]]
    penalty.rows = torch.tensor([False, True, True])
    penalty.apply(logits, tokens)
    assert logits.tolist() == [[0.5, 0.75, -1.0], [1.0, float("-inf"), 3.0], [0.0, -1.5, 0.0]]


def test_a_row_whose_last_timestamp_reached_its_audios_end_is_not_penalised():
    """Timestamp tokens from 10 (step 0); audio ends at step 100, so the slack of 1 s (50 steps) starts at step 50.
    Row 0 sampled a timestamp at step 60: not penalised. Row 1 only at step 40: penalised. Row 2's step-90 timestamp
    is in the prompt (before sample_begin = 2), not sampled: penalised. Row 3 sampled none: penalised."""
    penalty = EndOfTextPenalty(eot=1, penalty=2.0, sample_begin=2, timestamp_begin=10)
    penalty.audio_end = torch.tensor([100, 100, 100, 100])
    tokens = torch.tensor([[0, 3, 10, 4, 70], [0, 3, 10, 4, 50], [0, 100, 3, 4, 5], [0, 3, 4, 5, 6]])
    logits = torch.zeros(4, 3)
    penalty.apply(logits, tokens)
    assert logits[:, 1].tolist() == [0.0, -2.0, -2.0, -2.0]
    assert end_of_text.END_SLACK_SECONDS * 50 == 50  # 50 timestamp steps of 20 ms
    penalty.audio_end = torch.tensor([111, 111, 111, 111])  # the slack now starts at step 61: row 0 penalised too
    penalty.apply(logits, tokens)
    assert logits[:, 1].tolist() == [-2.0, -4.0, -4.0, -4.0]


def test_with_timestamps_each_decoding_row_is_given_its_own_audios_end(speech, monkeypatch):
    """The task gives the penalty, per decoding row (each clip's beams), its clip's end in timestamp steps of 20 ms:
    its real mel frames (`real_frame_counts`: before digital silence, the floor, or zero frames) halved."""
    seen = []
    monkeypatch.setattr(EndOfTextPenalty, "apply", lambda self, logits, tokens: seen.append(self.audio_end.clone()))
    model = random_rotary(n_text_ctx=448)
    model.eot_penalty = 1.0
    clips = speech[:2]
    windows = torch.stack([first_window(audio) for audio in clips])
    model.decode(windows, whisper.DecodingOptions(language="en", beam_size=3, sample_len=3, fp16=False))
    ends = [int(real_frame_counts(window)) // 2 for window in windows]
    assert ends[0] != ends[1] and seen
    assert seen[0].tolist() == [ends[0]] * 3 + [ends[1]] * 3
    # The first fixture ends in 0.43 s of digital silence: its end is its last sample that is not silence.
    assert abs(ends[0] - np.flatnonzero(clips[0])[-1] / whisper.audio.SAMPLE_RATE * 50) <= 2


def _eager(model, nats: float):
    """Make ``model`` end the text ``nats`` more eagerly: its decoder's end-of-text logit raised at every step."""

    def raise_end(module, args, output):
        output[..., EOT] += nats
        return output

    return model.decoder.register_forward_hook(raise_end)


@pytest.mark.parametrize("without_timestamps", [True, False])
@pytest.mark.parametrize("beam_size", [None, 3])
def test_a_penalty_undoes_exactly_an_eagerness_of_the_same_nats(speech, beam_size, without_timestamps, monkeypatch):
    """A model made 8 nats more eager ends its text early; the same model decoded with an 8-nat penalty gives the
    tokens and log-probabilities of the model as it was, with timestamps or without (each clip ends inside its
    window). A random model's timestamps fall anywhere, so the slack is moved past the window here: no row counts
    as having reached its audio's end; and it repeats its tokens, so the loop rule is off here too."""
    monkeypatch.setattr(end_of_text, "END_SLACK_SECONDS", -60.0)
    monkeypatch.setattr(end_of_text, "MAX_REPEAT_TOKENS", 0)
    model = random_rotary(n_text_ctx=448)
    windows = torch.stack([first_window(audio) for audio in speech[:3]])
    options = whisper.DecodingOptions(
        language="en", without_timestamps=without_timestamps, beam_size=beam_size, sample_len=10, fp16=False
    )
    plain = model.decode(windows, options)
    hook = _eager(model, 8.0)
    eager = model.decode(windows, options)
    assert all(len(e.tokens) < len(p.tokens) for e, p in zip(eager, plain))
    model.eot_penalty = 8.0
    undone = model.decode(windows, options)
    hook.remove()
    for before, after in zip(plain, undone):
        assert after.tokens == before.tokens
        assert after.avg_logprob == pytest.approx(before.avg_logprob, abs=1e-5)


def test_a_full_window_of_audio_cut_from_a_longer_recording_is_not_penalised(speech, monkeypatch):
    """Upstream's loop cuts 30-s windows out of a longer recording and, with timestamps, reads again what follows a
    window's last timestamp: the model's end of text stands there. In one batch, the clip that ends inside its
    window is penalised, the full window is not (the slack and the loops as above)."""
    monkeypatch.setattr(end_of_text, "END_SLACK_SECONDS", -60.0)
    monkeypatch.setattr(end_of_text, "MAX_REPEAT_TOKENS", 0)
    model = random_rotary(n_text_ctx=448)
    recording = np.concatenate([speech[i % len(speech)] for i in range(20)])  # over 30 s
    full = whisper.log_mel_spectrogram(recording)[:, :N_FRAMES]
    windows = torch.stack([full, first_window(speech[0])])
    assert holds_audio_end(windows).tolist() == [False, True]
    options = whisper.DecodingOptions(language="en", sample_len=10, fp16=False)
    plain = model.decode(windows, options)
    hook = _eager(model, 8.0)
    eager = model.decode(windows, options)
    model.eot_penalty = 8.0
    penalised = model.decode(windows, options)
    hook.remove()
    assert penalised[0].tokens == eager[0].tokens != plain[0].tokens
    assert penalised[1].tokens == plain[1].tokens != eager[1].tokens
    # Without timestamps the loop cannot read the rest again: every window is penalised.
    without = whisper.DecodingOptions(language="en", sample_len=10, fp16=False, without_timestamps=True)
    hook = _eager(model, 8.0)
    penalised = model.decode(windows, without)
    hook.remove()
    model.eot_penalty = 0.0
    assert [result.tokens for result in penalised] == [result.tokens for result in model.decode(windows, without)]


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


def test_a_text_that_ends_in_a_span_written_twice_in_a_row_counts_as_a_loop():
    rows = torch.tensor(
        [
            [9, 1, 2, 3, 1, 2, 3],  # "1 2 3" twice: a loop of 3 tokens
            [9, 9, 4, 1, 2, 1, 2],  # "1 2" twice
            [9, 9, 9, 9, 9, 4, 4],  # one token twice
            [1, 2, 3, 4, 1, 2, 3],  # 1 2 3 again, but not right after itself
            [1, 2, 3, 9, 1, 2, 3],
        ]
    )
    assert end_of_text.ends_in_a_repeat(rows, 32).tolist() == [True, True, True, False, False]
    assert end_of_text.ends_in_a_repeat(rows, 2).tolist() == [False, True, True, False, False]
    assert end_of_text.ends_in_a_repeat(rows[:, :1], 32).tolist() == [False] * 5  # one token cannot repeat
    assert end_of_text.ends_in_a_repeat(rows[:, :0], 32).tolist() == [False] * 5


@pytest.mark.parametrize("length", [2, 5, 9, 16, 40])
def test_the_loop_test_agrees_with_comparing_every_span(length):
    """Rows of a 3-token vocabulary repeat often: the one-comparison shortcut for the spans worth comparing must
    mark exactly the rows that comparing every span of up to 6 tokens marks."""
    rows = torch.randint(0, 3, (400, length), generator=torch.Generator().manual_seed(length))

    def every_span(row):
        return any(row[-span:] == row[-2 * span : -span] for span in range(1, min(6, len(row) // 2) + 1))

    expected = [every_span(row) for row in rows.tolist()]
    assert 0 < sum(expected) < len(expected)
    assert end_of_text.ends_in_a_repeat(rows, 6).tolist() == expected


def test_a_looping_row_takes_no_penalty_and_a_prompt_does_not_make_a_loop():
    """Row 0 has sampled "5 6 5 6"; row 1 sampled "5 6" after a prompt that ends "5 6" (sample_begin = 2): only
    its sampled tokens count, so it is penalised; row 2 never repeats."""
    penalty = EndOfTextPenalty(eot=1, penalty=2.0, sample_begin=2)
    tokens = torch.tensor([[0, 3, 5, 6, 5, 6], [5, 6, 7, 8, 5, 6], [0, 3, 5, 6, 7, 8]])
    logits = torch.zeros(3, 3)
    penalty.apply(logits, tokens)
    assert logits[:, 1].tolist() == [0.0, -2.0, -2.0]
    assert end_of_text.MAX_REPEAT_TOKENS == 32


def _scripted(model, first: int, second: int):
    """Make ``model`` write ``first second first second …``, with end of text 1 nat likelier than the next word at
    every step after the first: an eager model whose text, held open by a penalty, loops."""
    words = {first: second, second: first}

    def script(module, args, output):
        last = args[0][:, -1]  # (rows,) the token each row read last
        logits = torch.full_like(output[:, -1], -30.0)
        for row, token in enumerate(last.tolist()):
            logits[row, words.get(token, first)] = 0.0
            logits[row, EOT] = 1.0 if token in words else -30.0
        output[:, -1] = logits
        return output

    return model.decoder.register_forward_hook(script)


def test_the_penalty_does_not_hold_open_a_text_that_loops(monkeypatch):
    """The eager scripted model ends after its first word; a 2-nat penalty keeps it writing, "no yes no yes", and
    once the text ends in a span written twice the penalty lifts and the model's own end of text stands. Without
    the loop rule the same penalty holds the loop open to the length cap."""
    model = random_rotary(n_text_ctx=448)
    tokenizer = whisper.tokenizer.get_tokenizer(multilingual=False)
    no, yes = tokenizer.encode(" no")[0], tokenizer.encode(" yes")[0]
    window = first_window((0.01 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32))  # 1 s
    options = whisper.DecodingOptions(language="en", without_timestamps=True, sample_len=12, fp16=False)
    hook = _scripted(model, no, yes)
    assert model.decode(window, options).tokens == [no]
    model.eot_penalty = 2.0
    assert model.decode(window, options).tokens == [no, yes, no, yes]
    monkeypatch.setattr(end_of_text, "MAX_REPEAT_TOKENS", 0)
    assert model.decode(window, options).tokens == [no, yes] * 6
    hook.remove()
