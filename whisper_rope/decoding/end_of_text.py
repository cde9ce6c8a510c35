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
the source model as for the adapted one). And with timestamps a row whose last timestamp has reached its audio's end
(within `END_SLACK_SECONDS`) takes no penalty: its speech is written, and a model pushed on past it fills the rest of
the window with made-up segments (measured under ``transcribe``: "// //" or "da da da" after the last sentence;
docs/results.md, "The penalty stops at the audio's end").

Nor does a row whose text has begun to repeat itself (it ends in a span of tokens written twice in a row): the
penalty is there to keep sentences that follow, and a loop is not one. Without timestamps, where nothing else
says the speech is written, the penalty turned a model's few repeats of a misheard last sentence into a loop to
the length cap (docs/results.md, "A loop the penalty made").
"""

from typing import Optional

import torch
from torch import Tensor
from whisper.audio import TOKENS_PER_SECOND
from whisper.decoding import LogitFilter

#: How close to its audio's end (seconds) a row's last timestamp must be for the row to take no penalty. 1 s: a
#: model's last end timestamp falls within a few tenths of a second of its speech's end.
END_SLACK_SECONDS = 1.0

#: The longest span (tokens) whose immediate repeat counts as a loop: a sentence of tiny.en's vocabulary is rarely
#: longer, and a loop of a longer span has written it twice only after twice as many steps.
MAX_REPEAT_TOKENS = 32


class EndOfTextPenalty(LogitFilter):
    """Subtract ``penalty`` nats from the end-of-text logit of the rows ``rows`` marks (None: every row), each step.

    Applied before upstream's filters, as if the model's own logit were lower: the timestamp rules count end of
    text among the text tokens they weigh against the timestamps, and where they forbid it (a blank first token) it
    is forbidden as before. The penalty also lowers the end-of-text token's share of a hypothesis's summed
    log-probability, which transcribe's ``logprob_threshold`` fallback reads.

    With ``audio_end`` set (per row, the audio's end in timestamp steps from the window's start), a row whose last
    sampled timestamp token is at most `END_SLACK_SECONDS` before it takes no penalty; ``timestamp_begin`` is the
    tokenizer's first timestamp token and ``sample_begin`` the index of the first sampled token (prompts may hold
    timestamps of earlier windows). A row whose sampled tokens end in a repeat (`ends_in_a_repeat`) takes no
    penalty either.
    """

    def __init__(self, eot: int, penalty: float, sample_begin: int = 0, timestamp_begin: Optional[int] = None):
        self.eot = eot
        self.penalty = float(penalty)
        self.sample_begin = sample_begin
        self.timestamp_begin = timestamp_begin
        self.rows: Optional[Tensor] = None  # (rows,) bool, set per batch by the decoding task
        self.audio_end: Optional[Tensor] = None  # (rows,) int64 timestamp steps, set per batch by the decoding task

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        """logits: (rows, n_vocab), changed in place; tokens: (rows, n_tokens), the tokens so far."""
        rows = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.rows is not None:
            rows &= self.rows.to(logits.device)
        if self.audio_end is not None and self.timestamp_begin is not None:
            rows &= ~self.reached_audio_end(tokens).to(logits.device)
        rows &= ~ends_in_a_repeat(tokens[:, self.sample_begin :], MAX_REPEAT_TOKENS).to(logits.device)
        logits[rows, self.eot] -= self.penalty

    def reached_audio_end(self, tokens: Tensor) -> Tensor:
        """(rows,) bool: whether the row's last sampled timestamp is within `END_SLACK_SECONDS` of ``audio_end``."""
        sampled = tokens[:, self.sample_begin :]
        steps = torch.where(sampled >= self.timestamp_begin, sampled - self.timestamp_begin, -1)
        last = steps.amax(dim=-1) if sampled.shape[-1] else torch.full_like(tokens[:, 0], -1)
        slack = round(END_SLACK_SECONDS * TOKENS_PER_SECOND)  # timestamp steps (one per audio position, 20 ms)
        return (last >= 0) & (last >= self.audio_end.to(last.device) - slack)


def ends_in_a_repeat(sampled: Tensor, max_span: int) -> Tensor:
    """(rows,) bool: whether the row's tokens (``sampled``: (rows, n_tokens)) end in a span of 1 to ``max_span``
    tokens written twice in a row ("…, sir? Did you hear that, sir?" ending "Did you hear that, sir?" twice).

    A periodic text ends in such a repeat at every step once it has written its span twice, so a row stays marked
    for as long as it loops and no longer.
    """
    repeats = torch.zeros(sampled.shape[0], dtype=torch.bool, device=sampled.device)
    longest = min(max_span, sampled.shape[-1] // 2)
    if longest < 1:
        return repeats
    # A span can repeat only where the token that many places back equals the last one: one comparison finds
    # those spans, so a text that does not loop costs one operation a step, not one a span.
    back = sampled[:, -1 - longest : -1].flip(-1) == sampled[:, -1:]  # (rows, longest): column s - 1 is span s
    for span in (back.any(dim=0).nonzero().flatten() + 1).tolist():
        repeats |= (sampled[:, -span:] == sampled[:, -2 * span : -span]).all(dim=-1)
    return repeats
