"""Which parameters train, with which learning rate, on which schedule, in which precision.

Parameter policies name a subset of the model: ``all``; ``positional`` (positional tables, rotary gates, and every
self- and cross-attention projection); ``positional-path`` (what decides where attention looks: self-attention
query and key projections, rotary gates, learned positional tables — the parameters a positional change
invalidates); ``decoder``; ``encoder``; or a regular expression searched in parameter names.
"""

import contextlib
import functools
import math
import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

POLICIES = ("all", "positional", "positional-path", "decoder", "encoder")
_SELF_ATTENTION_QK = re.compile(r"\.attn\.(query|key)\.")


def in_policy(name: str, policy: str) -> bool:
    """Whether parameter ``name`` belongs to ``policy`` (see the module docstring)."""
    if policy == "all":
        return True
    if policy == "positional":
        return "positional_embedding" in name or ".attn." in name or ".cross_attn." in name
    if policy == "positional-path":
        return bool(_SELF_ATTENTION_QK.search(name)) or name.endswith("rotary_gate") or "positional_embedding" in name
    if policy in ("decoder", "encoder"):
        return name.startswith(policy + ".")
    return re.search(policy, name) is not None


def check_policy(policy: str, option: str) -> None:
    """Raise ValueError naming ``option`` unless ``policy`` is a known policy or a valid regular expression."""
    if policy in POLICIES:
        return
    try:
        re.compile(policy)
    except re.error as error:
        raise ValueError(
            f"{option} {policy!r} is neither one of {', '.join(POLICIES)} nor a valid regular expression ({error})"
        ) from None


def select_trainable(model: nn.Module, policy: str, always: Optional[Tuple[str, ...]] = None) -> List[str]:
    """Set ``requires_grad`` by the policy; returns the names of the trainable parameters.

    Parameters named in ``always`` (default: those the checkpoint did not provide, `newly_initialised`) and rotary
    gates always train. Raises ValueError when nothing is selected.
    """
    always = newly_initialised(model) if always is None else always
    names = []
    for name, parameter in model.named_parameters():
        chosen = in_policy(name, policy) or name in always or name.endswith("rotary_gate")
        parameter.requires_grad_(chosen)
        if chosen:
            names.append(name)
    if not names:
        raise ValueError(f"--train-policy {policy!r} selects no parameter of the model")
    return names


def newly_initialised(model: nn.Module) -> Tuple[str, ...]:
    """Parameters the load report says were not in the checkpoint (they must train whatever the policy)."""
    report = getattr(model, "load_report", None)
    return tuple(report.initialised) if report is not None else ()


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, lr_positional: Optional[float] = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices (ndim >= 2) only.

    With ``lr_positional``, the ``positional-path`` parameters get that peak learning rate and the rest ``lr``:
    a positional change must move the parameters that decide where attention looks much more than the others.
    Every parameter that could train is in a group (even while frozen), so that staged training can unfreeze it.
    """
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        positional = lr_positional is not None and in_policy(name, "positional-path")
        groups.setdefault((positional, parameter.ndim >= 2), []).append(parameter)
    param_groups = [
        {"params": params, "lr": lr_positional if positional else lr, "weight_decay": weight_decay if decay else 0.0}
        for (positional, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine/linear to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str):
    """A LambdaLR applying `lr_factor` to every group's peak learning rate."""
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_settings(optimizer: torch.optim.Optimizer) -> List[Tuple[float, float]]:
    """(peak learning rate, weight decay) of each parameter group, as `build_optimizer` and the schedule set them."""
    return [(group.get("initial_lr", group["lr"]), group["weight_decay"]) for group in optimizer.param_groups]


def apply_peak_settings(optimizer: torch.optim.Optimizer, scheduler, settings: List[Tuple[float, float]]) -> None:
    """Give a restored optimizer and its `lr_scheduler` the ``settings`` of `peak_settings` (this run's --lr,
    --lr-positional, --weight-decay) while keeping their moments and position: a resumed run trains with changed
    settings from its next step, at the point of the schedule where it stopped."""
    scheduler.base_lrs = [peak for peak, _ in settings]
    for group, (peak, decay), factor in zip(optimizer.param_groups, settings, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = peak, decay
        group["lr"] = peak * factor(scheduler.last_epoch)


def precision(choice: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None for fp32, whether to use a GradScaler) for ``--precision choice`` on ``device``."""
    if device.type != "cuda":
        if choice in ("bf16", "fp16"):
            raise ValueError(f"--precision {choice} needs a CUDA device; the CPU trains in fp32")
        return None, False
    if choice == "fp32":
        return None, False
    if choice == "bf16" or (choice == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute every residual block's activations in the backward pass while the context is active.

    Only forward passes that record gradients are checkpointed; decoding (no grad, kv-cache) runs unchanged.
    """
    if not enabled:
        yield
        return
    blocks = list(model.encoder.blocks) + list(model.decoder.blocks)

    def wrap(forward: Callable) -> Callable:
        @functools.wraps(forward)
        def checkpointed(*args, **kwargs):
            if torch.is_grad_enabled() and kwargs.get("kv_cache") is None:
                return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        return checkpointed

    for block in blocks:
        block.forward = wrap(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's method
