"""Beam search whose per-step candidate selection runs as tensor operations over all clips' beams at once.

Upstream's `whisper.decoding.BeamSearchDecoder.update` walks, in Python, every clip and every beam at each step: a
``topk`` per beam, a tuple of the whole token sequence per candidate (``beam_size * (beam_size + 1)`` per clip), a
sort of a dict per clip. With a batch of clips that bookkeeping costs as much as a decoding step of tiny.en.
`BatchBeamSearchDecoder` makes the same choices with one ``topk`` over (rows, vocabulary), one stable sort over
(clips, candidates) and a few masks; only the candidates that finish (end of text) become tuples, kept in upstream's
structure (a dict per clip), so that ``finalize``, patience and the sequence ranker stay upstream's.

The same choices, including upstream's tie rules: candidates are ranked by score with ties in upstream's insertion
order (beam, then rank within the beam; Python's sort and ``torch.sort(stable=True)`` both keep it), and a sequence
reached from two identical beams (every beam at the first step) counts once, at its first position with the last
one's score and source row, as upstream's dict keyed by the sequence keeps it. Scores are summed in float32, as
upstream sums them.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.decoding import BeamSearchDecoder

__all__ = ["BatchBeamSearchDecoder"]


class BatchBeamSearchDecoder(BeamSearchDecoder):
    """Upstream's `BeamSearchDecoder` (same constructor, same results) with a vectorised ``update``."""

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor) -> Tuple[Tensor, bool]:
        """tokens: (n_audio * beam_size, length); logits: (n_audio * beam_size, n_vocab); sum_logprobs:
        (n_audio * beam_size,) float32, updated in place. Returns the next tokens (n_audio * beam_size, length + 1)
        and whether every clip has ``max_candidates`` finished sequences."""
        n_rows, beam = tokens.shape[0], self.beam_size
        if n_rows % beam:
            raise ValueError(f"{n_rows} decoding rows are not a whole number of beams of {beam}")
        n_audio = n_rows // beam
        if self.finished_sequences is None:
            self.finished_sequences = [{} for _ in range(n_audio)]

        logprobs = F.log_softmax(logits.float(), dim=-1)
        top_logprobs, top_tokens = logprobs.topk(beam + 1)  # (n_rows, beam + 1) each
        scores = (sum_logprobs[:, None] + top_logprobs).view(n_audio, -1)  # (n_audio, n_candidates)
        candidates = top_tokens.view(n_audio, -1)
        sources = torch.arange(n_rows, device=tokens.device).repeat_interleave(beam + 1).view(n_audio, -1)
        scores, sources, kept = _merge_repeated_sequences(tokens.view(n_audio, beam, -1), candidates, scores, sources)

        order = scores.sort(dim=-1, descending=True, stable=True).indices
        scores, candidates, sources, kept = (t.gather(1, order) for t in (scores, candidates, sources, kept))
        is_eot = candidates == self.eot
        continuing = kept & ~is_eot
        continuing_so_far = continuing.cumsum(dim=-1)  # upstream stops at the beam_size-th continuing candidate
        chosen = continuing & (continuing_so_far <= beam)
        finished = kept & is_eot & (continuing_so_far < beam)
        if not bool((chosen.sum(dim=-1) == beam).all()):
            raise RuntimeError(f"beam search found fewer than {beam} continuing candidates for a clip")

        chosen_sources = sources[chosen]
        sum_logprobs.copy_(scores[chosen])
        self._add_finished(tokens, finished, sources, scores)
        next_tokens = torch.cat([tokens[chosen_sources], candidates[chosen][:, None]], dim=-1)
        self.inference.rearrange_kv_cache(chosen_sources.tolist())
        completed = all(len(sequences) >= self.max_candidates for sequences in self.finished_sequences)
        return next_tokens, completed

    def _add_finished(self, tokens: Tensor, finished: Tensor, sources: Tensor, scores: Tensor) -> None:
        """Add the sequences that end this step (``finished``: (n_audio, n_candidates) bool, in ranked order) to
        each clip's dict of finished sequences, best first, until it holds ``max_candidates``."""
        for clip, position in finished.nonzero().tolist():
            sequences = self.finished_sequences[clip]
            if len(sequences) < self.max_candidates:
                sequence = tuple(tokens[sources[clip, position]].tolist() + [self.eot])
                sequences[sequence] = scores[clip, position].item()


def _merge_repeated_sequences(
    beams: Tensor, candidates: Tensor, scores: Tensor, sources: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Candidates that extend identical beams with the same token are one sequence: keep its first occurrence, with
    the score and source row of its last (upstream's dict semantics).

    beams: (n_audio, beam_size, length) tokens; candidates, scores, sources: (n_audio, n_candidates), candidate c
    extending beam ``c // (n_candidates // beam_size)``. Returns scores, sources and ``kept`` (bool), same shapes.
    """
    n_audio, beam, _ = beams.shape
    kept = torch.ones_like(candidates, dtype=torch.bool)
    same_beam = (beams[:, :, None, :] == beams[:, None, :, :]).all(dim=-1)  # (n_audio, beam, beam)
    if int(same_beam.sum()) == n_audio * beam:  # all beams distinct (every step but the first): nothing repeats
        return scores, sources, kept
    per_beam = candidates.shape[1] // beam
    beam_of = torch.arange(candidates.shape[1], device=candidates.device) // per_beam
    repeated = same_beam[:, beam_of][:, :, beam_of] & (candidates[:, :, None] == candidates[:, None, :])
    positions = torch.arange(candidates.shape[1], device=candidates.device)
    kept = ~(repeated & (positions[None, :] < positions[:, None])).any(dim=-1)  # no earlier occurrence
    last = torch.where(repeated, positions, -1).amax(dim=-1)
    return scores.gather(1, last), sources.gather(1, last), kept
