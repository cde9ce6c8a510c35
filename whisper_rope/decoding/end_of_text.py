"""A decoding-time penalty on ending the text, for models adapted to unpadded input.

A student distilled from a 30-s-window teacher onto each clip's own frames ends the text a little more eagerly than
the teacher where a sentence ends and more speech follows: on average 0.2 nats more margin for end of text over the
likeliest other token, enough to tip the few boundaries where the teacher itself hesitates (docs/results.md, "Why
windows still end early"). Taking a fixed number of nats off the end-of-text logit moves those boundaries back.

Decoding without timestamps takes it on every window: the text ends where the model ends it. With timestamps only
the windows that hold the end of their audio take it (`features.holds_audio_end`; `BatchDecodingTask` says which):
upstream's loop cuts full 30-s windows out of a longer recording and reads again whatever follows a window's last
timestamp, so a model that ends its text before a sentence cut at the window's edge is right to. Penalised there
too, both models write the cut sentence's first words and lose them (measured: more errors on long recordings, for
the source model as for the adapted one).
"""

from typing import Optional

from torch import Tensor
from whisper.decoding import LogitFilter


class EndOfTextPenalty(LogitFilter):
    """Subtract ``penalty`` nats from the end-of-text logit of the rows ``rows`` marks (None: every row), each step.

    Applied before upstream's filters, as if the model's own logit were lower: the timestamp rules count end of
    text among the text tokens they weigh against the timestamps, and where they forbid it (a blank first token) it
    is forbidden as before. The penalty also lowers the end-of-text token's share of a hypothesis's summed
    log-probability, which transcribe's ``logprob_threshold`` fallback reads.
    """

    def __init__(self, eot: int, penalty: float):
        self.eot = eot
        self.penalty = float(penalty)
        self.rows: Optional[Tensor] = None  # (rows,) bool, set per batch by the decoding task

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        """logits: (rows, n_vocab), changed in place; tokens: (rows, n_tokens), unused."""
        if self.rows is None:
            logits[:, self.eot] -= self.penalty
        else:
            logits[self.rows.to(logits.device), self.eot] -= self.penalty
