"""The loss of one micro-batch: token cross-entropy, KL towards the teacher, and internal-state terms.

Every term is a *sum* over the micro-batch divided by a *global* count (target tokens, compared state values)
summed over the ranks, then multiplied by ``world_size / grad_accum``: DDP averages gradients over ranks, so the
update is that of the whole global batch on one process, and accumulation adds up to one batch's mean.

The teacher's part comes from the teacher cache (`teacher_cache`): its states on the clip, and its output
distribution, which is its final decoder state times its (frozen) token embedding — so a distilling run never
runs the teacher's 30-s encoder after the cache is filled. A training window over 30 s has no teacher states (the
teacher reads 30 s at a time; its target is its halves' transcripts joined): its rows count in the cross-entropy
only (``Batch.teacher_rows``), at weight 1 when ``ce`` is 0 (label-free runs), else at ``ce``.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import IGNORE_INDEX, Batch
from ..features import audio_position_mask
from .distributed import DistributedContext
from .losses import StateRecorder, StateWeights, recorded_modules, stacked_states, state_terms


@dataclass(frozen=True)
class Objective:
    """How the terms are weighted.

    ce: weight of the token cross-entropy against the batch's labels (references, or the teacher's transcript).
    kl: weight of KL(teacher || student) on the target tokens' distributions, at ``temperature`` (scaled by T²).
    states: weights of the internal-state terms (`losses.StateWeights`).
    """

    ce: float = 1.0
    kl: float = 0.0
    temperature: float = 2.0
    label_smoothing: float = 0.0
    states: StateWeights = field(default_factory=StateWeights)

    @property
    def uses_teacher(self) -> bool:
        return self.kl > 0 or bool(self.states.active)

    @property
    def needs_logits(self) -> bool:
        return self.ce > 0 or self.kl > 0

    @property
    def cached_kinds(self) -> Tuple[str, ...]:
        """The state kinds the teacher cache must hold (the final decoder state gives the teacher's logits)."""
        kinds = set(self.states.active)
        if self.kl > 0:
            kinds.add("decoder_layers")
        return tuple(
            kind for kind in ("decoder_layers", "encoder_output", "encoder_layers", "attention") if kind in kinds
        )


class StudentForward(nn.Module):
    """The student's teacher-forced forward as one module (what DDP wraps): logits if needed, and the recorded
    internal states. ``model`` is a `WhisperRope`; ``kinds`` the state kinds to record; ``packed``: encode unpadded
    batches packed (`packing.py`), unless encoder-internal states are recorded (packed blocks see one sequence)."""

    def __init__(self, model: nn.Module, kinds: Tuple[str, ...], packed: bool = False):
        super().__init__()
        self.model = model
        self.kinds = kinds
        self.packed = packed and not {"encoder_layers", "attention"} & set(kinds)

    def forward(self, mel: Tensor, tokens: Tensor, n_frames: Optional[Tensor], logits: bool = True):
        """Returns (logits (b, t, n_vocab) or None, the recorded states by kind). Without logits the decoder stops
        at its final layer norm: no n_vocab-wide projection, forward or backward."""
        recording = StateRecorder(recorded_modules(self.model, self.kinds)) if self.kinds else nullcontext()
        with recording as recorder:
            audio = self.model.encoder(mel, n_frames, packed=self.packed)
            xa_mask = audio_position_mask(n_frames, audio.shape[1], audio.device)
            decoder = self.model.decoder
            out = decoder(tokens, audio, xa_mask=xa_mask) if logits else decoder.hidden(tokens, audio, xa_mask=xa_mask)
        states = stacked_states(recorder, audio if "encoder_output" in self.kinds else None) if self.kinds else {}
        return (out if logits else None), states


def micro_batch_loss(
    student: nn.Module,
    teacher_embedding: Optional[Tensor],
    batch: Batch,
    objective: Objective,
    context: DistributedContext,
    grad_accum: int,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Dict[str, float], float]:
    """Forward one micro-batch; returns (loss to backpropagate, statistics summed over ranks, global target tokens).

    student: a `StudentForward` (possibly DDP-wrapped); teacher_embedding: the teacher's token embedding
    (n_vocab, d) when ``objective.kl`` > 0; batch: on the training device, with ``teacher_states`` when the
    objective uses the teacher. Statistics: ``ce`` and ``kl`` summed over target tokens, each state kind's summed
    squared error, ``loss`` (the un-scaled total), ``seconds`` of audio.
    """
    device = batch.mel.device
    target_mask = batch.labels != IGNORE_INDEX
    untaught = _untaught(batch.teacher_rows)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        needs_logits = objective.needs_logits or untaught is not None
        logits, states = student(batch.mel, batch.tokens, batch.n_frames, logits=needs_logits)
    zero = torch.zeros((), device=device)
    ce_sum = kl_sum = zero
    ce_weight = objective.ce
    if objective.ce > 0:
        ce_sum = _ce_sum(logits, batch.labels, objective.label_smoothing)
    elif untaught is not None:  # label-free: the windows the teacher has no states of learn its joined transcripts
        labels = batch.labels.masked_fill(~untaught[:, None], IGNORE_INDEX)
        ce_sum, ce_weight = _ce_sum(logits, labels, objective.label_smoothing), 1.0
    if objective.kl > 0:
        taught = _taught(target_mask, batch.teacher_rows)
        kl_sum = _kl_sum(
            logits, batch.teacher_states["decoder_layers"][-1], teacher_embedding, taught, objective.temperature
        )
    terms = {}
    if objective.states.active:
        token_mask = _taught(batch.tokens_mask(), batch.teacher_rows)
        terms = state_terms(states, batch.teacher_states, objective.states, token_mask, batch.teacher_positions)
    counts = [target_mask.sum().double()] + [count for _, count in terms.values()]
    counts = context.all_reduce_sum(torch.stack(counts).to(device=device, dtype=torch.float64)).tolist()
    n_tokens, state_counts = counts[0], dict(zip(terms, counts[1:]))
    scale = context.world_size / grad_accum
    loss = (ce_weight * ce_sum + objective.kl * kl_sum) / max(n_tokens, 1.0)
    for kind, (total, _) in terms.items():
        loss = loss + getattr(objective.states, kind) * total / max(state_counts[kind], 1.0)
    names = ["ce", "kl", *terms, "loss", "seconds"]
    values = [
        ce_sum,
        kl_sum,
        *(total for total, _ in terms.values()),
        loss,
        torch.tensor(float(sum(batch.seconds)), device=device),
    ]
    summed = context.all_reduce_sum(torch.stack([v.detach().double() for v in values])).tolist()
    stats = dict(zip(names, summed))
    stats.update({f"{kind}_count": state_counts[kind] for kind in terms})
    return loss * scale, stats, n_tokens


def _ce_sum(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Token cross-entropy of ``logits`` (b, t, n_vocab) against ``labels`` (b, t), summed over the labelled ones."""
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


def _untaught(rows: Optional[Tensor]) -> Optional[Tensor]:
    """(b,) True for the rows without teacher states (windows over 30 s), or None when every row has them."""
    return None if rows is None or bool(rows.all()) else ~rows


def _taught(mask: Tensor, rows: Optional[Tensor]) -> Tensor:
    """``mask`` (b, t) without the rows that have no teacher states (``rows`` (b,) False: windows over 30 s)."""
    return mask if rows is None else mask & rows[:, None]


def _kl_sum(
    logits: Tensor, teacher_hidden: Tensor, embedding: Tensor, target_mask: Tensor, temperature: float
) -> Tensor:
    """KL(teacher || student) summed over the target tokens, times T². teacher_hidden: (b, t, d) final states."""
    teacher_logits = teacher_hidden[target_mask].float() @ embedding.float().T
    student_log_p = F.log_softmax(logits.float()[target_mask] / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="sum") * temperature**2
