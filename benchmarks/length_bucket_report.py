"""Tabulate and draw models' WER on the length-bucket sets of ``benchmarks/length_buckets.py``.

    python benchmarks/length_bucket_report.py --results DIR [DIR ...] --models source=SOURCE_TAG adapted=ADAPTED_TAG \
        [--bootstrap 2000] [--out REPORT.md] [--plot REPORT.png]

``DIR`` holds what ``whisper-rope evaluate --output DIR/<tag>-<set>.json`` writes for one draw of the sets: the
summary and, beside it, the per-utterance rows (``DIR/<tag>-<set>.jsonl``), which the report reads; the long
recordings through the batched path are ``<tag>-batched-<set>.json``. The report has one row per set (each split's
buckets, real-dev and the long recordings through both long-form paths) and one column per model: WER in %, with the
count of hypotheses that reached evaluate's decoding cap, and whether the model is within 10 % relative (or 1
point) of the first model's WER — the target of the label-free recipes.

Several ``DIR``s (draws of the sets with other seeds, so other windows and recordings) are pooled: a set's row counts
every unit (window, or whole long recording) of every draw the first model was evaluated on, and the other models
are compared on exactly those. Pass each draw once: a draw that holds another (``--long 5`` and ``--long 2`` of one
seed share their first recordings) would count those units twice.

``--bootstrap N`` adds, for each other model, the 95 % interval of its WER minus the first model's, in points, from N
paired resamples of the set's units (each resample draws units with replacement and scores both models on the same
ones). A row whose verdict turns on one or two words shows it there: its interval reaches past the allowance.

The plot draws WER against window length for every split and model.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from whisper_rope.evaluation.evaluate import output_paths

SPLITS = ("in-domain", "retained", "retained-festival")
BUCKETS = ("0-5s", "5-10s", "10-20s", "20-30s")
#: Every set in report order: (label, file stem after the tag).
SETS = (
    [(f"{split} {bucket}", f"{split}-{bucket}") for split in SPLITS for bucket in BUCKETS]
    + [("real-dev (13 real recordings)", "real-dev")]
    + [(f"{name} long, loop", f"{name}-long") for name in SPLITS]
    + [("real-dev joined (52 s), loop", "real-dev-long")]
    + [(f"{name} long, batched", f"batched-{name}-long") for name in SPLITS]
    + [("real-dev joined (52 s), batched", "batched-real-dev-long")]
)
#: Seed of the bootstrap's resamples, so that a report is the same every time it is made.
BOOTSTRAP_SEED = 0


@dataclass
class Scores:
    """One model on one set, pooled over draws: per unit (a window, or a whole long recording) in draw order.

    units: (draw folder, audio path) of each unit, to pair models unit by unit. errors, words: (n_units,) word
    errors and normalised reference words. capped: units whose hypothesis reached evaluate's cap. seconds: audio."""

    units: List[Tuple[str, str]]
    errors: np.ndarray
    words: np.ndarray
    capped: int
    seconds: float

    @property
    def wer(self) -> float:
        """Corpus WER: every unit's errors over every unit's reference words (as evaluate scores one set)."""
        return float(self.errors.sum()) / max(int(self.words.sum()), 1)


def result_files(results: Path, tag: str, stem: str) -> Tuple[Path, Path]:
    """(summary, per-utterance rows) of ``evaluate --output RESULTS/TAG-STEM.json``."""
    return output_paths(results / f"{tag}-{stem}.json")


def has_result(results: Path, tag: str, stem: str) -> bool:
    """Whether ``results`` holds evaluate's per-utterance rows of ``tag`` on set ``stem``. Raises ValueError when the
    summary is there but its rows are not (the report pools and resamples the rows)."""
    summary, rows = result_files(results, tag, stem)
    if summary.is_file() and not rows.is_file():
        raise ValueError(f"{rows}: missing; the report reads the per-utterance rows evaluate writes beside {summary}")
    return rows.is_file()


def read_rows(results: Path, tag: str, stem: str) -> List[dict]:
    """The per-utterance rows evaluate wrote for ``tag`` on set ``stem`` in ``results``, in manifest order."""
    _, rows = result_files(results, tag, stem)
    text = rows.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pooled(folders: Sequence[Path], tag: str, stem: str) -> Optional[Scores]:
    """``tag``'s rows on set ``stem`` from every folder of ``folders`` in order; None when a folder lacks them."""
    if not folders or not all(has_result(folder, tag, stem) for folder in folders):
        return None
    rows = [(str(folder), row) for folder in folders for row in read_rows(folder, tag, stem)]
    return Scores(
        units=[(folder, row["audio"]) for folder, row in rows],
        errors=np.array([row["substitutions"] + row["deletions"] + row["insertions"] for _, row in rows], dtype=int),
        words=np.array([row["n_words"] for _, row in rows], dtype=int),
        capped=sum(bool(row["capped"]) for _, row in rows),
        seconds=float(sum(row["seconds"] for _, row in rows)),
    )


def scores_of(folders: Sequence[Path], models: Dict[str, str], stem: str) -> List[Optional[Scores]]:
    """Each model's pooled scores on ``stem``, over the folders that hold the first model's result (over the folders
    that hold its own when the first model has none). Raises ValueError when a model was scored on other units."""
    reference = [folder for folder in folders if has_result(folder, next(iter(models.values())), stem)]
    found: List[Optional[Scores]] = []
    for tag in models.values():
        scores = pooled(reference or [f for f in folders if has_result(f, tag, stem)], tag, stem)
        first = found[0] if found and reference else None
        if first is not None and scores is not None and scores.units != first.units:
            raise ValueError(f"{tag}-{stem}: its rows are other audio than the first model's; evaluate both on one set")
        if first is not None and scores is not None and not np.array_equal(scores.words, first.words):
            raise ValueError(f"{tag}-{stem}: its references differ from the first model's; evaluate both on one set")
        found.append(scores)
    return found


def within_target(wer: float, reference: float) -> bool:
    """Within 10 % relative or 1 point (absolute WER fractions), whichever is larger."""
    return wer <= reference + max(0.1 * reference, 0.01) + 1e-12  # the bound itself counts as within


def difference_interval(reference: Scores, other: Scores, resamples: int) -> Tuple[float, float]:
    """The 95 % interval of ``other``'s WER minus ``reference``'s (WER fractions) over ``resamples`` paired bootstrap
    resamples of the units (`scores_of` has checked that both were scored on the same ones)."""
    picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(reference.units), (resamples, len(reference.units)))
    words = np.maximum(reference.words[picks].sum(axis=1), 1)
    differences = (other.errors[picks].sum(axis=1) - reference.errors[picks].sum(axis=1)) / words
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def _points(difference: float) -> str:
    """A WER difference in signed points to one decimal; a difference that rounds to zero is "+0.0", not "-0.0"."""
    return f"{round(100 * difference, 1) + 0.0:+.1f}"


def table(results: Sequence[Path], models: Dict[str, str], bootstrap: int = 0) -> str:
    """The markdown table: one row per set that any model has a result for (pooled over ``results``)."""
    names = list(models)
    head = "| set | units | words | " + " | ".join(f"{name} WER % (capped)" for name in names) + " | within target |"
    head += "".join(f" {name} − {names[0]}, points (95 % interval) |" for name in names[1:]) if bootstrap else ""
    columns = len(names) + 4 + (len(names) - 1 if bootstrap else 0)
    lines = [head, "|" + "---|" * columns]
    for label, stem in SETS:
        found = scores_of(results, models, stem)
        present = [f for f in found if f is not None]
        if not present:
            continue
        cells = ["–" if f is None else f"{100 * f.wer:.1f} ({f.capped})" for f in found]
        paired = all(f is not None for f in found)
        verdict = ", ".join("yes" if within_target(f.wer, found[0].wer) else "no" for f in found[1:]) if paired else ""
        line = f"| {label} | {len(present[0].units)} | {int(present[0].words.sum())} | " + " | ".join(cells)
        line += f" | {verdict} |"
        for other in found[1:] if bootstrap else []:
            if paired:
                low, high = difference_interval(found[0], other, bootstrap)
                line += f" {_points(other.wer - found[0].wer)} [{_points(low)}, {_points(high)}] |"
            else:
                line += "  |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Path], models: Dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SPLITS), figsize=(4 * len(SPLITS), 3.2), sharey=True)
    for axis, split in zip(axes, SPLITS):
        buckets = [scores_of(results, models, f"{split}-{bucket}") for bucket in BUCKETS]  # [bucket][model]
        for column, name in enumerate(models):
            found = [scores[column] for scores in buckets if scores[column] is not None]
            points = [(f.seconds / len(f.units), 100 * f.wer) for f in found]
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set_title(split)
        axis.set_xlabel("window length, s (mean of the set)")
    axes[0].set_ylabel("WER %")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, nargs="+", required=True, help="folders of evaluate's results, one per draw (pooled)"
    )
    parser.add_argument("--models", nargs="+", required=True, help="NAME=TAG pairs; the first is the reference")
    parser.add_argument(
        "--bootstrap", type=int, default=0, help="paired resamples for each difference's 95 %% interval (0: none)"
    )
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--plot", type=Path, help="draw WER against window length here (PNG)")
    args = parser.parse_args()
    if args.bootstrap < 0:
        parser.error("--bootstrap must be 0 or more")
    if not all("=" in pair for pair in args.models):
        parser.error(f"--models takes NAME=TAG pairs, got {' '.join(args.models)!r}")
    models = dict(pair.split("=", 1) for pair in args.models)
    try:
        report = table(args.results, models, args.bootstrap)
    except ValueError as error:
        parser.error(str(error))
    print(report, end="")
    if args.out:
        args.out.write_text(report)
    if args.plot:
        plot(args.results, models, args.plot)


if __name__ == "__main__":
    main()
