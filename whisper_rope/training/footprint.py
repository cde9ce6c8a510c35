"""The disk a fine-tuning run's output directory needs, computed before the first step from the model and the
settings, so that a run that will not fit says so at its start rather than failing at its last checkpoint."""

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import WhisperRope
from .config import FinetuneConfig
from .state import SAVE_DTYPES

#: Bytes per element of the AdamW state: two float32 moments per trained weight.
_ADAM_BYTES = 2 * 4


@dataclass(frozen=True)
class RunFootprint:
    """Bytes of each kind of file a run writes: ``model`` one model file in --save-dtype, ``state`` one step
    checkpoint's training state, ``step_checkpoints`` how many step directories stay, ``best`` whether a best/ model is
    kept (it shares the final model's file when the best WER is at the last step)."""

    model: int
    state: int
    step_checkpoints: int
    best: bool
    save_dtype: str

    @property
    def most(self) -> int:
        """The most the run's files take: final model, best/, and the kept step checkpoints, none shared."""
        return self.model * (1 + self.best) + self.step_checkpoints * (self.model + self.state)

    def summary(self, output: Path) -> str:
        """One line for the start of a run; names a shortfall of free space."""
        parts = [f"model.pt {_size(self.model)} ({self.save_dtype})"]
        if self.best:
            parts.append(f"best/ up to {_size(self.model)} more (none when the best is the final model)")
        if self.step_checkpoints:
            parts.append(
                f"{self.step_checkpoints} step checkpoint(s) of {_size(self.model + self.state)} "
                f"(model {_size(self.model)} + training state {_size(self.state)})"
            )
        line = f"this run needs up to {_size(self.most)} in {str(output)!r}: {'; '.join(parts)}"
        free = shutil.disk_usage(output).free
        if free < self.most:
            line += f"; only {_size(free)} is free there"
        return line


def disk_estimate(config: FinetuneConfig, model: WhisperRope, evaluates: bool) -> RunFootprint:
    """The footprint of a run of ``model`` (its trainable parameters selected) under ``config``; ``evaluates``:
    whether the run has an evaluation set (and so a best/ model)."""
    dtype = SAVE_DTYPES[config.save_dtype]
    weights = model.state_dict()
    stored = sum(
        t.numel() * (_itemsize(dtype) if t.is_floating_point() else t.element_size()) for t in weights.values()
    )
    overhead = 1024 * len(weights)  # torch.save's zip entry, record name and alignment per tensor, rounded up
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Trained weights end between float16 values: a float16 save keeps them in float32 in the training state too.
    rounded = trained * 4 if dtype != torch.float32 else 0
    saves = math.ceil(config.steps / config.save_every) if config.save_every else 0
    return RunFootprint(
        model=stored + overhead,
        state=trained * _ADAM_BYTES + rounded + 2 * overhead,
        step_checkpoints=min(saves, config.keep_last),
        best=evaluates,
        save_dtype=config.save_dtype,
    )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _size(n_bytes: int) -> str:
    if n_bytes >= 10**9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes >= 10**6:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e3:.0f} kB"
