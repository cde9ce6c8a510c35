"""The final evaluation of a recipe run: the adapted model as it will be used, next to the source model as it was.

The data: ``--eval``, or for a label-free run its held-out clips with the teacher's transcripts, joined also into
windows of 5-30 s and one recording of them all (`holdout.every_length_holdout`), so that every length bucket and
the long-form paths are scored, not only clips shaped like the training clips.

A model with an end-of-text penalty (``eot_penalty``, `decoding.end_of_text`) gets a third row: the source decoded
with the same penalty, so that what the penalty gives alone is seen apart from what the adaptation gives.

Each row: WER, how many hypotheses ran into the length cap (loops) and the WER of the others — on a small set one
looping hypothesis can add tens of points, so both are shown — and the real-time factor. Below it, a row per clip
length bucket (`metrics.LENGTH_BUCKETS`) with each model's WER and capped hypotheses side by side; recordings over
30 s are transcribed through upstream's loop (the ``> 30 s`` row) and again through the batched long-form path
(``> 30 s, batched``). Written to ``final_evaluation.json`` and ``final_evaluation.md`` in the run's directory.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..data import Manifest, read_manifest
from ..evaluation.evaluate import EvaluationResult, evaluate
from ..evaluation.metrics import length_bucket_table
from ..fs.atomic import atomic_write_text
from ..training.config import FinetuneConfig
from ..training.holdout import HOLDOUT_MANIFEST, every_length_holdout
from ..training.state import REPORT_JSON_FILE, REPORT_TABLE_FILE
from ..weights.loading import load_model

#: The name of the row of the source decoded with the adapted model's end-of-text penalty (then its nats).
PENALISED_SOURCE = "source, end-of-text penalty"


def wer_without_capped(result: EvaluationResult) -> Optional[float]:
    """Corpus WER over the hypotheses that stopped before their length cap (None when every one was capped)."""
    rows = [row for row in result.rows if not row.capped]
    words = sum(row.n_words for row in rows)
    if not words:
        return None
    return sum(row.substitutions + row.deletions + row.insertions for row in rows) / words


def final_evaluation(result, config: FinetuneConfig, progress: bool = True) -> Optional[str]:
    """Evaluate the run's final model (in the form it was trained for) and, against real references, the source
    model on 30-s windows. Returns the Markdown table (also written beside the model), or None without an
    evaluation set."""
    output = Path(result.output)
    data, teacher_references = _evaluation_data(config, output)
    if data is None:
        return None
    model = result.model
    rows = [_row("fine-tuned", model, *_evaluations(model, data, config.batch_size, progress))]
    # Against the teacher's transcripts the teacher scores 0 % on the clips it transcribed, but not on windows
    # of several clips or the recording of them all: the row the adapted model is to be compared with.
    source_name = (config.teacher or config.model) if teacher_references else config.model
    device = next(model.parameters()).device
    source = load_model(
        source_name, variant="whisper" if teacher_references else None, device=device, progress=progress
    )
    rows.insert(0, _row("source", source, *_evaluations(source, data, config.batch_size, progress)))
    if getattr(model, "eot_penalty", 0.0):
        source.configure(eot_penalty=model.eot_penalty)
        penalised = _evaluations(source, data, config.batch_size, progress)
        rows.insert(1, _row(f"{PENALISED_SOURCE} {model.eot_penalty:g}", source, *penalised))
    references = (
        "the teacher's 30-s transcripts of the held-out clips, joined in order for windows of several of them"
        if teacher_references
        else "the manifest's text"
    )
    table = _table(rows, data, references)
    atomic_write_text(
        output / REPORT_JSON_FILE,
        json.dumps({"data": str(data), "references": references, "rows": rows}, indent=2) + "\n",
    )
    atomic_write_text(output / REPORT_TABLE_FILE, table + "\n")
    return table


def _evaluation_data(config: FinetuneConfig, output: Path):
    """(evaluation manifest, whether its references are the teacher's transcripts), or (None, False)."""
    if config.eval is not None:
        return config.eval, False
    holdout = output / HOLDOUT_MANIFEST
    if config.eval_holdout != 0 and holdout.is_file():  # None: a recipe's share of the clips
        return every_length_holdout(holdout, output, config.seed), True
    return None, False


def _evaluations(model, data, batch_size: int, progress: bool) -> Tuple[EvaluationResult, Optional[EvaluationResult]]:
    """The evaluation of ``data`` (recordings over 30 s through upstream's loop) and, when it holds such recordings,
    theirs through the batched long-form path (else None)."""
    evaluation = evaluate(model, data, batch_size=batch_size, progress=progress)
    long_rows = {row.row for row in evaluation.rows if row.long_form is not None}
    if not long_rows:
        return evaluation, None
    manifest = read_manifest(data, require_text=False)
    long = Manifest(manifest.source, [example for example in manifest.examples if example.row in long_rows])
    return evaluation, evaluate(model, long, batch_size=batch_size, long_form="batched", progress=progress)


def _row(name: str, model, evaluation: EvaluationResult, batched: Optional[EvaluationResult] = None) -> Dict[str, Any]:
    """The table's row of one model; ``batched``: its recordings over 30 s through the batched long-form path, shown
    as the bucket ``> 30 s, batched``."""
    buckets = [asdict(bucket) for bucket in evaluation.buckets]
    if batched is not None:
        buckets += [{**asdict(bucket), "bucket": f"{bucket.bucket}, batched"} for bucket in batched.buckets]
    return {
        "model": name,
        "variant": getattr(model, "variant", "whisper"),
        "input": "unpadded" if evaluation.unpadded else "30-s windows",
        "wer": evaluation.wer,
        "capped": evaluation.n_capped,
        "clips": evaluation.n_utterances,
        "wer_without_capped": wer_without_capped(evaluation),
        "rtf": evaluation.rtf,
        "buckets": buckets,
    }


def _table(rows: List[Dict[str, Any]], data, references: str) -> str:
    lines = [
        f"Final evaluation on {data} (references: {references})",
        "",
        "| model | variant | input | WER % | capped | WER % without capped | real-time factor |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        uncapped = "–" if row["wer_without_capped"] is None else f"{100 * row['wer_without_capped']:.1f}"
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['input']} | {100 * row['wer']:.1f} | "
            f"{row['capped']}/{row['clips']} | {uncapped} | {row['rtf']:.3f} |"
        )
    columns = {f"{row['model']} ({row['input']})": row["buckets"] for row in rows}
    lines += ["", "WER per clip length:", "", length_bucket_table(columns)]
    return "\n".join(lines)
