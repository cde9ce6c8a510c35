"""Positional transplant: move a pretrained checkpoint to rotary embeddings continuously instead of at once.

A hard swap (load pretrained weights into ``rotary/rotary``) throws away the absolute tables the checkpoint was
trained with, and the model falls off a cliff. The transplant starts from a hybrid with *gated* RoPE — for the
target ``rotary/rotary`` the hybrid ``rotary+sinusoidal/rotary+learned``, for ``rotary/learned`` (the encoder
alone) ``rotary+sinusoidal/learned``: every rotated self-attention rotates its queries and keys by
``x + g * (rope(x) - x)`` with a per-head gate ``g`` initialised to 0, so at step 0 the model computes exactly the
pretrained function (on unpadded input with the encoder's table sliced, exactly the sliced-table model). During
fine-tuning the tables of the sides that turn rotary are scaled by ``alpha(step)`` from 1 to 0 while the gates are
driven from 0 to 1 (or learn freely). A run that ends with ``alpha = 0`` and every gate at 1 is a pure rotary
model: `finalize_transplant` turns it into a plain model of the target variant with a load report.
"""

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from ..errors import VariantError
from ..model import WhisperRope
from ..variants import parse_variant
from ..weights.loading import LoadReport, adapt_state_dict

#: Target variant -> the gated hybrid a transplant to it trains (RoPE next to the tables it replaces).
TRANSPLANT_TARGETS = {
    "rotary/rotary": "rotary+sinusoidal/rotary+learned",
    "rotary/learned": "rotary+sinusoidal/learned",
}
#: The hybrid of a transplant to rotary/rotary (kept for one release: the name of 0.1).
TRANSPLANT_VARIANT = TRANSPLANT_TARGETS["rotary/rotary"]
SHAPES = ("linear", "cosine")


def transplant_start_variant(target: "str | None") -> str:
    """The gated hybrid a transplant to ``target`` (a preset or ENCODER/DECODER) starts from.

    Raises VariantError for targets no transplant reaches.
    """
    name = parse_variant(target or "rotary").name
    if name not in TRANSPLANT_TARGETS:
        raise VariantError(
            f"a transplant ends in {' or '.join(TRANSPLANT_TARGETS)}; --variant {target!r} is another variant"
        )
    return TRANSPLANT_TARGETS[name]


def transplant_target(start: str) -> str:
    """The variant a transplant from the hybrid ``start`` ends in."""
    for target, hybrid in TRANSPLANT_TARGETS.items():
        if parse_variant(start).name == hybrid:
            return target
    raise VariantError(f"{start!r} is not a transplant hybrid ({', '.join(TRANSPLANT_TARGETS.values())})")


def ramp(step: int, start: int, span: int, shape: str = "linear") -> float:
    """0 before ``start``, 1 after ``start + span``; linear or half-cosine in between."""
    if shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if span <= 0:
        return 0.0 if step < start else 1.0
    progress = min(max((step - start) / span, 0.0), 1.0)
    return progress if shape == "linear" else 0.5 - 0.5 * math.cos(math.pi * progress)


@dataclass(frozen=True)
class TransplantSchedule:
    """When the absolute tables fade out and (optionally) when the gates open.

    anneal_start, anneal_steps: alpha falls from 1 to 0 over ``[anneal_start, anneal_start + anneal_steps]``.
    shape: ``linear`` or ``cosine`` (for both ramps).
    sides: which tables fade: ``both``, ``encoder`` or ``decoder`` (the other keeps alpha = 1: a hybrid).
    gate_steps: None lets the gates learn; otherwise they are fixed and driven from 0 to 1 over
        ``[gate_start, gate_start + gate_steps]``.
    """

    anneal_start: int = 0
    anneal_steps: int = 1000
    shape: str = "cosine"
    sides: str = "both"
    gate_start: int = 0
    gate_steps: Optional[int] = None

    def __post_init__(self):
        if self.sides not in ("both", "encoder", "decoder"):
            raise ValueError(f"transplant sides must be both, encoder or decoder, got {self.sides!r}")
        ramp(0, 0, 1, self.shape)

    @property
    def anneal_end(self) -> int:
        """The first step at which the tables are at scale 0."""
        return self.anneal_start + max(self.anneal_steps, 0)

    def table_scale(self, step: int) -> float:
        return 1.0 - ramp(step, self.anneal_start, self.anneal_steps, self.shape)

    def gate_value(self, step: int) -> Optional[float]:
        """The value every gate is set to at ``step``, or None when the gates learn."""
        if self.gate_steps is None:
            return None
        return ramp(step, self.gate_start, self.gate_steps, self.shape)

    def fades(self, side: str) -> bool:
        """Whether the table of ``side`` (encoder or decoder) fades."""
        return self.sides in ("both", side)


def rotary_gates(model: WhisperRope) -> Iterator[nn.Parameter]:
    """Every self-attention gate of the model (encoder first)."""
    for coder in (model.encoder, model.decoder):
        for block in coder.blocks:
            if block.attn.rotary_gate is not None:
                yield block.attn.rotary_gate


def check_transplant_model(model: WhisperRope) -> None:
    """Raise unless ``model`` is a gated hybrid a transplant can start from."""
    if not (model.gated_rotary and model.variant in TRANSPLANT_TARGETS.values()):
        raise VariantError(
            f"a transplant needs a gated hybrid model (variant {' or '.join(TRANSPLANT_TARGETS.values())} with "
            f"gated_rotary=True), got {model.variant!r} with gated_rotary={model.gated_rotary}"
        )


def finishes(schedule: TransplantSchedule, model: WhisperRope) -> bool:
    """Whether ``schedule`` fades every table the transplant of ``model`` replaces (else the run ends a hybrid)."""
    return schedule.fades("encoder") and (schedule.fades("decoder") or not model.parsed_variant.decoder.rotary)


def apply_schedule(model: WhisperRope, schedule: TransplantSchedule, step: int) -> Tuple[float, Optional[float]]:
    """Set the table scales (and scheduled gates) for ``step``. Returns (alpha, gate value or None)."""
    alpha = schedule.table_scale(step)
    model.set_table_scales(
        encoder=alpha if schedule.fades("encoder") else None, decoder=alpha if schedule.fades("decoder") else None
    )
    gate = schedule.gate_value(step)
    if gate is not None:
        with torch.no_grad():
            for parameter in rotary_gates(model):
                parameter.fill_(gate)
                parameter.requires_grad_(False)
    return alpha, gate


def finalize_transplant(model: WhisperRope, tolerance: float = 1e-3) -> Tuple[WhisperRope, LoadReport]:
    """Turn a finished transplant (replaced tables at 0, every gate at 1) into a plain model of its target variant
    (``rotary/rotary`` or ``rotary/learned``).

    Raises VariantError naming what is not finished yet. The returned model shares no tensors with ``model``.
    """
    check_transplant_model(model)
    target = transplant_target(model.variant)
    unfinished = []
    faded = [model.encoder] + ([model.decoder] if model.parsed_variant.decoder.rotary else [])
    if any(coder.table_scale != 0.0 for coder in faded):
        unfinished.append(f"table scales are {model.encoder.table_scale:g}/{model.decoder.table_scale:g}, not 0")
    gates = torch.cat([g.detach().flatten() for g in rotary_gates(model)])
    if (gates - 1).abs().max() > tolerance:
        unfinished.append(f"gates range {gates.min():.3f}..{gates.max():.3f}, not 1 ± {tolerance:g}")
    if unfinished:
        raise VariantError("the transplant has not finished: " + "; ".join(unfinished))
    plain = WhisperRope(model.dims, target, rotary_theta=model.rotary_theta).to(next(model.parameters()).device)
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state, report = adapt_state_dict(source, model.variant, plain, source="finished transplant")
    plain.load_state_dict(state, strict=True)
    plain.register_buffer("alignment_heads", model.alignment_heads.clone(), persistent=False)
    plain.configure(unpadded=model.unpadded, unpadded_margin=model.unpadded_margin, eot_penalty=model.eot_penalty)
    plain.load_report = report
    return plain, report
