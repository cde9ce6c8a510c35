"""A decoding-time penalty on ending the text, for models adapted to unpadded input.

A student distilled from a 30-s-window teacher onto each clip's own frames ends the text a little more eagerly than
the teacher where a sentence ends and more speech follows: on average 0.2 nats more margin for end of text over the
likeliest other token, enough to tip the few boundaries where the teacher itself hesitates (docs/results.md, "Why
windows still end early"). Taking a fixed number of nats off the end-of-text logit moves those boundaries back.

Only decoding without timestamps takes it (`BatchDecodingTask`): with timestamps a window ends at a timestamp
pair, upstream's loop seeks on it, and the same penalty there only trades one word for another (measured: more
errors through upstream's loop, for the source model as for the adapted one).
"""

from torch import Tensor
from whisper.decoding import LogitFilter


class EndOfTextPenalty(LogitFilter):
    """Subtract ``penalty`` nats from the end-of-text logit of every row at every step.

    Applied after upstream's filters: where they forbid end of text (-inf: a blank first token) it stays forbidden.
    The penalty also lowers the end-of-text token's share of a hypothesis's summed log-probability, which
    transcribe's ``logprob_threshold`` fallback reads.
    """

    def __init__(self, eot: int, penalty: float):
        self.eot = eot
        self.penalty = float(penalty)

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        """logits: (rows, n_vocab), changed in place; tokens: (rows, n_tokens), unused."""
        logits[:, self.eot] -= self.penalty
