"""Tabulate and draw models' WER on the length-bucket sets of ``benchmarks/length_buckets.py``.

    python benchmarks/length_bucket_report.py --results DIR --models source=SOURCE_TAG adapted=ADAPTED_TAG \
        [--out REPORT.md] [--plot REPORT.png]

``DIR`` holds ``whisper-rope evaluate --output DIR/<tag>-<set>.json`` summaries, one per model tag and set (the long
recordings through the batched path as ``<tag>-batched-<set>.json``). The report has one row per set (each split's
buckets, real-dev and the long recordings through both long-form paths) and one column per model: WER in %, with the
count of hypotheses that reached evaluate's decoding cap, and whether the model is within 10 % relative (or 1
point) of the first model's WER — the target of the label-free recipes. The plot draws WER against window length
for every split and model.
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

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


def read(results: Path, tag: str, stem: str) -> Optional[dict]:
    path = results / f"{tag}-{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def within_target(wer: float, reference: float) -> bool:
    """Within 10 % relative or 1 point (absolute WER fractions), whichever is larger."""
    return wer <= reference + max(0.1 * reference, 0.01) + 1e-12  # the bound itself counts as within


def table(results: Path, models: Dict[str, str]) -> str:
    names = list(models)
    head = "| set | " + " | ".join(f"{name} WER % (capped)" for name in names) + " | within target |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for label, stem in SETS:
        found = [read(results, models[name], stem) for name in names]
        if all(f is None for f in found):
            continue
        cells = ["–" if f is None else f"{100 * f['wer']:.1f} ({f['n_capped']})" for f in found]
        verdict = ""
        if found[0] is not None and all(f is not None for f in found[1:]):
            verdict = ", ".join("yes" if within_target(f["wer"], found[0]["wer"]) else "no" for f in found[1:])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(results: Path, models: Dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SPLITS), figsize=(4 * len(SPLITS), 3.2), sharey=True)
    for axis, split in zip(axes, SPLITS):
        for name, tag in models.items():
            points: List[tuple] = []
            for bucket in BUCKETS:
                found = read(results, tag, f"{split}-{bucket}")
                if found is not None:
                    points.append((found["audio_seconds"] / found["n_utterances"], 100 * found["wer"]))
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
    parser.add_argument("--results", type=Path, required=True, help="folder of evaluate's JSON summaries")
    parser.add_argument("--models", nargs="+", required=True, help="NAME=TAG pairs; the first is the reference")
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--plot", type=Path, help="draw WER against window length here (PNG)")
    args = parser.parse_args()
    models = dict(pair.split("=", 1) for pair in args.models)
    report = table(args.results, models)
    print(report, end="")
    if args.out:
        args.out.write_text(report)
    if args.plot:
        plot(args.results, models, args.plot)


if __name__ == "__main__":
    main()
