"""Upstream's timestamp rules applied to all decoding rows at once.

`whisper.decoding.ApplyTimestampRules` masks each step's logits so that timestamps come in pairs, never decrease,
and win when their total probability beats every text token; it checks the rows one at a time in Python (a
``tolist`` of the row's tokens, a ``logsumexp`` and a ``max`` per row). With 40 rows (8 clips x 5 beams) that costs a
sixth of a tiny.en decoding step. `BatchTimestampRules` applies the same masks with a few tensor operations over
(rows, vocabulary); its logits equal upstream's bit for bit (tests/decoding/test_timestamp_rules.py).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.decoding import ApplyTimestampRules

__all__ = ["BatchTimestampRules"]


class BatchTimestampRules(ApplyTimestampRules):
    """`ApplyTimestampRules` (same constructor, same masks) over every row in tensor operations."""

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        """logits: (n_rows, n_vocab), masked in place; tokens: (n_rows, length), everything so far."""
        begin = self.tokenizer.timestamp_begin
        if self.tokenizer.no_timestamps is not None:
            logits[:, self.tokenizer.no_timestamps] = float("-inf")
        sampled = tokens[:, self.sample_begin :]
        if sampled.shape[1] > 0:
            self._pair_and_order_rules(logits, sampled)
        if tokens.shape[1] == self.sample_begin:
            logits[:, :begin] = float("-inf")  # the first sampled token is a timestamp
            if self.max_initial_timestamp_index is not None:
                logits[:, begin + self.max_initial_timestamp_index + 1 :] = float("-inf")
        # A timestamp is sampled when the timestamps' total probability beats every single text token.
        logprobs = F.log_softmax(logits.float(), dim=-1)
        timestamp_wins = logprobs[:, begin:].logsumexp(dim=-1) > logprobs[:, :begin].amax(dim=-1)
        _mask_rows(logits, timestamp_wins, slice(None, begin))

    def _pair_and_order_rules(self, logits: Tensor, sampled: Tensor) -> None:
        """Timestamps come in pairs (after a lone one only a timestamp or end of text, after a pair only text) and
        never decrease; a segment after a pair is at least one step long. sampled: (n_rows, n_sampled >= 1)."""
        begin, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
        is_timestamp = sampled >= begin
        last = is_timestamp[:, -1]
        penultimate = is_timestamp[:, -2] if sampled.shape[1] > 1 else torch.ones_like(last)
        _mask_rows(logits, last & penultimate, slice(begin, None))
        _mask_rows(logits, last & ~penultimate, slice(None, eot))
        positions = torch.arange(sampled.shape[1], device=sampled.device)
        latest = torch.where(is_timestamp, positions, -1).amax(dim=-1)  # position of each row's last timestamp
        latest_value = sampled.gather(1, latest.clamp(min=0)[:, None])[:, 0]
        # After a lone timestamp the next may repeat it (closing the segment); otherwise it must be later.
        lowest_allowed = torch.where(last & ~penultimate, latest_value, latest_value + 1)
        columns = torch.arange(logits.shape[1] - begin, device=logits.device)
        too_early = (latest >= 0)[:, None] & (columns[None, :] < (lowest_allowed - begin)[:, None])
        logits[:, begin:].masked_fill_(too_early, float("-inf"))


def _mask_rows(logits: Tensor, rows: Tensor, columns: slice) -> None:
    """``logits[rows, columns] = -inf`` for a (n_rows,) bool ``rows``, writing only those rows (indexing with the
    bool mask itself would sweep every row's columns)."""
    (indices,) = rows.nonzero(as_tuple=True)
    if indices.numel():
        logits[indices, columns] = float("-inf")
