"""Distillation losses on internal states: what a student must keep of its teacher besides the output distribution.

A positional change (a table sliced to the real frames, RoPE instead of a table) changes every activation of the
model a little; matching only the output logits leaves the student free to get there by another route, which it
does not find in a short fine-tune. Matching the *internal* states of the frozen teacher — every decoder layer's
hidden state on teacher-forced tokens (as audio-context fine-tuning does), the encoder's output on the clip's own
positions, optionally every encoder layer and the self-attention outputs — gives a dense target at every layer.

States are recorded with forward hooks (`StateRecorder`), so the model code knows nothing about distillation, and
they are compared by `masked_mse`, which returns a *sum* and a *count* so that the training loop can normalise over
the global batch under DDP exactly as it does the cross-entropy.

Shapes: batch ``b``, audio positions ``n`` (20 ms each), decoder tokens ``t``, width ``d``.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

#: The internal states a run can distil, in the order they are stored in the teacher cache.
STATE_KINDS = ("decoder_layers", "encoder_output", "encoder_layers", "attention")


@dataclass(frozen=True)
class StateWeights:
    """Weights of the internal-state losses (0 turns a term off).

    decoder_layers: every decoder block's output and the final layer norm's, on teacher-forced tokens.
    encoder_output: the encoder's output (after ``ln_post``) on the clip's own positions.
    encoder_layers: every encoder block's output on the clip's own positions.
    attention: every self-attention output (encoder blocks on the clip's positions, decoder blocks on the tokens).
    """

    decoder_layers: float = 0.0
    encoder_output: float = 0.0
    encoder_layers: float = 0.0
    attention: float = 0.0

    def __post_init__(self) -> None:
        for kind in STATE_KINDS:
            value = getattr(self, kind)
            if not (value >= 0.0 and value != float("inf")):
                raise ValueError(f"distillation weight of {kind} must be a finite number >= 0, got {value!r}")

    @property
    def active(self) -> Tuple[str, ...]:
        """The kinds with a non-zero weight."""
        return tuple(kind for kind in STATE_KINDS if getattr(self, kind) > 0)

    @property
    def needs_encoder_positions(self) -> bool:
        return any(getattr(self, kind) > 0 for kind in ("encoder_output", "encoder_layers", "attention"))


def recorded_modules(model: nn.Module, kinds: Tuple[str, ...]) -> Dict[str, nn.Module]:
    """Name -> module whose output is a state of the given kinds, for a `whisper.model.Whisper`-shaped model.

    Names: ``decoder.i`` (block outputs) and ``decoder.ln``; ``encoder.i``; ``encoder.i.attn`` / ``decoder.i.attn``
    (self-attention outputs). The encoder's own output needs no hook: the forward pass returns it.
    """
    modules: Dict[str, nn.Module] = {}
    if "decoder_layers" in kinds:
        modules.update({f"decoder.{i}": block for i, block in enumerate(model.decoder.blocks)})
        modules["decoder.ln"] = model.decoder.ln
    if "encoder_layers" in kinds:
        modules.update({f"encoder.{i}": block for i, block in enumerate(model.encoder.blocks)})
    if "attention" in kinds:
        for side in ("encoder", "decoder"):
            modules.update({f"{side}.{i}.attn": block.attn for i, block in enumerate(getattr(model, side).blocks)})
    return modules


class StateRecorder:
    """Records the outputs of named modules during the forward passes made inside its ``with`` block.

    Attention modules return ``(output, qk)``; the recorder keeps ``output``. A module called several times (it
    should not be, during one teacher-forced forward) keeps its last output.
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.states: Dict[str, Tensor] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "StateRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: tuple, output) -> None:
            self.states[name] = output[0] if isinstance(output, tuple) else output

        return record

    def group(self, prefix: str, suffix: str = "") -> List[Tensor]:
        """States whose names are ``prefix.<i>suffix``, in layer order (``decoder.ln`` last for the decoder)."""
        layers = []
        index = 0
        while f"{prefix}.{index}{suffix}" in self.states:
            layers.append(self.states[f"{prefix}.{index}{suffix}"])
            index += 1
        if prefix == "decoder" and not suffix and "decoder.ln" in self.states:
            layers.append(self.states["decoder.ln"])
        return layers


def stacked_states(recorder: StateRecorder, encoder_output: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The recorded states by kind, each stacked over layers.

    Returns a dict with any of: ``decoder_layers`` (L + 1, b, t, d), ``encoder_output`` (b, n, d),
    ``encoder_layers`` (L, b, n, d), ``encoder_attention`` (L, b, n, d), ``decoder_attention`` (L, b, t, d).
    """
    states: Dict[str, Tensor] = {}
    for key, prefix, suffix in (
        ("decoder_layers", "decoder", ""),
        ("encoder_layers", "encoder", ""),
        ("encoder_attention", "encoder", ".attn"),
        ("decoder_attention", "decoder", ".attn"),
    ):
        layers = recorder.group(prefix, suffix)
        if layers:
            states[key] = torch.stack(layers)
    if encoder_output is not None:
        states["encoder_output"] = encoder_output
    return states


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Squared error summed over the positions where ``mask`` is True, and how many values were summed.

    student, teacher: (..., b, n, d) of the same shape (leading dimensions: layers); mask: (b, n) bool.
    Returns (sum of squared differences in fp32, number of compared values as a fp64 scalar): the caller divides
    the global sum by the global count, so that a batch split over ranks gives the same loss as on one process.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student state {tuple(student.shape)} and teacher state {tuple(teacher.shape)} differ")
    weights = mask.to(torch.float32)
    squared = (student.float() - teacher.float()).pow(2).sum(dim=-1)  # (..., b, n)
    total = (squared * weights).sum()
    count = (
        weights.sum().to(torch.float64) * student.shape[-1] * (student.numel() // (mask.numel() * student.shape[-1]))
    )
    return total, count


def position_mask(n_positions: Tensor, width: int) -> Tensor:
    """(b,) real positions per clip -> (b, width) bool, True where a position holds the clip."""
    return torch.arange(width, device=n_positions.device)[None, :] < n_positions[:, None]


def state_terms(
    student: Dict[str, Tensor],
    teacher: Dict[str, Tensor],
    weights: StateWeights,
    token_mask: Tensor,
    audio_positions: Tensor,
) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Per active kind, (squared-error sum, count) between student and teacher states.

    student: `stacked_states` of the student's forward; teacher: the same keys, padded like the student's
    (teacher encoder states cut to the clip's positions), or {} when no row of the batch has any (each term then
    sums nothing over nothing). token_mask: (b, t) True where a decoder position is
    compared (the teacher-forced sequence, without padding). audio_positions: (b,) positions compared per clip.
    Encoder states are compared on ``min(student, teacher)`` positions of the batch's widths: the student of an
    unpadded clip has only the clip's positions, the teacher's 30-s window has them first.
    """
    if not teacher:  # no row has teacher states (every window over 30 s): no state to compare, each term zero
        zero = torch.zeros((), device=token_mask.device)
        return {kind: (zero, zero.to(torch.float64)) for kind in weights.active}
    terms: Dict[str, Tuple[Tensor, Tensor]] = {}
    if weights.decoder_layers > 0:
        terms["decoder_layers"] = masked_mse(student["decoder_layers"], teacher["decoder_layers"], token_mask)
    for kind, key in (("encoder_output", "encoder_output"), ("encoder_layers", "encoder_layers")):
        if getattr(weights, kind) > 0:
            terms[kind] = _encoder_term(student[key], teacher[key], audio_positions)
    if weights.attention > 0:
        encoder = _encoder_term(student["encoder_attention"], teacher["encoder_attention"], audio_positions)
        decoder = masked_mse(student["decoder_attention"], teacher["decoder_attention"], token_mask)
        terms["attention"] = (encoder[0] + decoder[0], encoder[1] + decoder[1])
    return terms


def _encoder_term(student: Tensor, teacher: Tensor, audio_positions: Tensor) -> Tuple[Tensor, Tensor]:
    width = min(student.shape[-2], teacher.shape[-2])
    mask = position_mask(audio_positions.clamp(max=width), width)
    return masked_mse(student[..., :width, :], teacher[..., :width, :], mask)
