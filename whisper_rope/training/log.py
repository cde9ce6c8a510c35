"""The training log of a fine-tuning run (``train_log.jsonl``) and the curves drawn from it."""

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import PathLike
from ..fs.files import append_text

logger = logging.getLogger("whisper_rope")


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class TrainingLog:
    """Appends records to ``train_log.jsonl`` (rank 0 only) and keeps them in memory."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.records: List[Dict[str, Any]] = []

    def write(self, record: Dict[str, Any]) -> None:
        record = jsonable(record)
        self.records.append(record)
        if self.path is not None:
            append_text(self.path, json.dumps(record) + "\n")


def plot_curves(log_path: PathLike, png_path: PathLike) -> Optional[Path]:
    """Draw training/validation loss and WER against steps from a ``train_log.jsonl``; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'whisper-rope[train]'); no training curves drawn")
        return None
    records = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train" and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if r.get("event") == "eval"]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_axes, wer_axes = figure.subplots(1, 2)
    if train:
        loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if evals:
        loss_axes.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        wer_axes.plot([r["step"] for r in evals], [100 * r["wer"] for r in evals], "o-", label="WER")
        wer_axes.plot([r["step"] for r in evals], [100 * r["cer"] for r in evals], "s--", label="CER")
    loss_axes.set(xlabel="step", ylabel="cross-entropy per token", title="loss")
    losses = [r["loss"] for r in train] + [r["loss"] for r in evals if isinstance(r.get("loss"), (int, float))]
    if losses and min(losses) > 0:
        loss_axes.set_yscale("log")  # fine-tuning losses fall by orders of magnitude
    wer_axes.set(xlabel="step", ylabel="%", title="validation error rates (greedy)")
    for axes in (loss_axes, wer_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return Path(png_path)
