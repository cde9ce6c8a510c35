"""`BatchBeamSearchDecoder` makes upstream's `BeamSearchDecoder`'s choices: same tokens, scores, finished sequences,
cache reorderings, on random logits with ties and on real tiny.en clips."""

import copy

import pytest
import torch
import whisper
from whisper.decoding import BeamSearchDecoder

import whisper_rope
import whisper_rope.decoding.task
from whisper_rope.decoding.beam_search import BatchBeamSearchDecoder

from ..conftest import randomise_, small_dims
from ..speech_helpers import first_window

EOT = 7
VOCAB = 40


class RecordedInference:
    """Stands in for the decoder's inference: remembers every cache reordering asked for."""

    def __init__(self):
        self.reorderings = []

    def rearrange_kv_cache(self, source_indices):
        self.reorderings.append(list(source_indices))


def step_logits(generator: torch.Generator, n_rows: int, beam: int) -> torch.Tensor:
    """Logits on a coarse grid (many exact ties), end of text often among the best, rows of a clip identical
    half the time (so that identical beams, as at the first step, propose the same candidates)."""
    logits = torch.randint(-8, 8, (n_rows, VOCAB), generator=generator).float() / 2
    logits[:, EOT] += torch.rand(n_rows, generator=generator) * 3
    if torch.rand(1, generator=generator).item() < 0.5:
        logits = logits.view(-1, beam, VOCAB)[:, :1].expand(-1, beam, -1).reshape(n_rows, VOCAB).clone()
    return logits


def run_both(n_audio: int, beam: int, patience, steps: int, seed: int):
    """Feed both decoders the same logits step by step from the same start; assert equal state after each step."""
    generator = torch.Generator().manual_seed(seed)
    ours = BatchBeamSearchDecoder(beam, EOT, RecordedInference(), patience)
    theirs = BeamSearchDecoder(beam, EOT, RecordedInference(), patience)
    tokens = torch.tensor([[1, 2, 3]]).repeat(n_audio * beam, 1)  # every beam the same prompt, as upstream starts
    sums = torch.zeros(n_audio * beam)
    our_sums, their_sums = sums.clone(), sums.clone()
    finished_some = False
    for _ in range(steps):
        logits = step_logits(generator, n_audio * beam, beam)
        our_tokens, our_done = ours.update(tokens.clone(), logits.clone(), our_sums)
        their_tokens, their_done = theirs.update(tokens.clone(), logits.clone(), their_sums)
        assert torch.equal(our_tokens, their_tokens) and torch.equal(our_sums, their_sums)
        assert our_done == their_done
        assert ours.inference.reorderings == theirs.inference.reorderings
        assert [list(d.items()) for d in ours.finished_sequences] == [
            list(d.items()) for d in theirs.finished_sequences
        ]
        finished_some |= any(ours.finished_sequences)
        tokens = our_tokens
        if our_done:
            break
    grouped = tokens.view(n_audio, beam, -1)
    assert finalized(ours, grouped, our_sums) == finalized(theirs, grouped, their_sums)
    return finished_some


def finalized(decoder, grouped, sums):
    tokens, scores = decoder.finalize(grouped, sums.view(grouped.shape[:2]))
    return [[t.tolist() for t in clip] for clip in tokens], scores


@pytest.mark.parametrize("n_audio", [1, 2, 5, 8])
@pytest.mark.parametrize("beam, patience", [(2, None), (5, None), (5, 2.0), (3, 0.5)])
def test_random_logits_give_upstreams_choices_step_by_step(n_audio, beam, patience):
    finished = [run_both(n_audio, beam, patience, steps=12, seed=seed) for seed in range(6)]
    assert any(finished)  # end-of-text candidates were met and bookkept


def test_identical_beams_with_different_logits_keep_the_last_score_at_the_first_position():
    """Upstream's dict keyed by sequence: a repeated sequence stays where it first appeared, with the score and
    source row of its last occurrence. Beams 0 and 2 of the clip are the same sequence here, beam 1 differs."""
    tokens = torch.tensor([[1, 2, 5], [1, 2, 6], [1, 2, 5]])
    logits = torch.zeros(3, VOCAB)
    logits[0, [10, 11, 12, 13]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    logits[2, [11, 10, 14, 13]] = torch.tensor([4.5, 3.5, 2.5, 0.5])
    logits[1, [20, 21, 22, 23]] = torch.tensor([1.0, 0.9, 0.8, 0.7])
    sums = torch.tensor([-1.0, -0.5, -1.25])
    ours = BatchBeamSearchDecoder(3, EOT, RecordedInference())
    theirs = BeamSearchDecoder(3, EOT, RecordedInference())
    our_sums, their_sums = sums.clone(), sums.clone()
    our_tokens, _ = ours.update(tokens.clone(), logits.clone(), our_sums)
    their_tokens, _ = theirs.update(tokens.clone(), logits.clone(), their_sums)
    assert torch.equal(our_tokens, their_tokens) and torch.equal(our_sums, their_sums)
    # Token 10 follows beam 0 at -1.79 but beam 2 at -2.90: the sequence keeps beam 2's score and ranks second.
    assert ours.inference.reorderings == theirs.inference.reorderings == [[2, 2, 1]]
    assert our_tokens[:, -1].tolist() == [11, 10, 20]
    assert our_sums.tolist() == pytest.approx([-1.903, -2.903, -3.316], abs=1e-3)


def decode_with(decoder_class, model, mel, options):
    """``model.decode`` with `BatchDecodingTask` building ``decoder_class`` for beam search."""
    original = whisper_rope.decoding.task.BatchBeamSearchDecoder
    whisper_rope.decoding.task.BatchBeamSearchDecoder = decoder_class
    try:
        return model.decode(mel, options)
    finally:
        whisper_rope.decoding.task.BatchBeamSearchDecoder = original


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_small_random_model_batches_decode_as_with_upstreams_beam_search(speech, batch):
    """A random model rarely ends its text: beams run to the token cap unfinished and ``finalize`` fills in."""
    model = randomise_(whisper_rope.build_model(small_dims(n_text_ctx=64), "whisper")).eval()
    windows = torch.stack([first_window(audio)[:, : 2 * 24] for audio in speech[:batch]])
    for options in (
        whisper.DecodingOptions(language="en", beam_size=3, fp16=False, sample_len=10),
        whisper.DecodingOptions(language="en", beam_size=4, fp16=False, sample_len=8, patience=2.0, length_penalty=0.5),
    ):
        ours = decode_with(BatchBeamSearchDecoder, model, windows, options)
        theirs = decode_with(BeamSearchDecoder, model, windows, options)
        assert [r.tokens for r in ours] == [r.tokens for r in theirs]
        assert [r.avg_logprob for r in ours] == [r.avg_logprob for r in theirs]
        assert all(len(r.tokens) > 0 for r in ours)


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_real_tiny_en_batches_decode_as_with_upstreams_beam_search(speech, compute_type):
    model = whisper_rope.load_model("tiny.en", device="cpu", compute_type=compute_type)
    windows = torch.stack([first_window(audio) for audio in speech])
    for batch, options in (
        (1, whisper.DecodingOptions(language="en", beam_size=5, fp16=False)),
        (3, whisper.DecodingOptions(language="en", beam_size=5, fp16=False, patience=2.0, length_penalty=0.6)),
        (8, whisper.DecodingOptions(language="en", beam_size=4, fp16=False, sample_len=24)),
    ):
        ours = decode_with(BatchBeamSearchDecoder, model, windows[:batch], options)
        theirs = decode_with(BeamSearchDecoder, model, windows[:batch], options)
        assert [r.tokens for r in ours] == [r.tokens for r in theirs]
        assert [r.avg_logprob for r in ours] == [r.avg_logprob for r in theirs]
        assert all(len(r.tokens) > 3 for r in ours)


def test_upstream_decode_of_one_clip_matches_the_batched_decoder(speech):
    """Upstream's own `DecodingTask` (its decoder, its inference) on one clip gives what `WhisperRope.decode` gives."""
    model = whisper_rope.load_model("tiny.en", device="cpu")
    window = first_window(speech[0])
    options = whisper.DecodingOptions(language="en", beam_size=5, fp16=False)
    upstream = whisper.decoding.DecodingTask(copy.copy(model), options).run(window[None])[0]
    ours = model.decode(window, options)
    assert ours.tokens == upstream.tokens and ours.avg_logprob == upstream.avg_logprob
