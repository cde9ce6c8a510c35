"""Ways from a checkpoint to unpadded decoding, at one budget: the table and plots of docs/results.md.

    python benchmarks/unpadded_routes.py --corpus CORPUS --out DIR [--routes NAME ...] [--seeds 0 1] [--steps 300]

Every route trains label-free (the source model fed 30-s windows is the teacher; its transcript is the target) on
the corpus's ``train`` split with the same steps, batch, schedule and teacher cache, then is evaluated unpadded on
every evaluation split (``in-domain``, ``retained``, ``retained-festival`` of ``benchmarks/build_corpus.py``) next to
the source model fed 30-s windows and fed the sliced table untrained. Each result is written as soon as it exists
(``DIR/<route>-seed<S>/result.json``); a rerun skips finished routes whose settings are unchanged and re-runs the
others. ``DIR/routes.md`` and ``DIR/routes.png`` tabulate and draw them.

WER is reported with the number of hypotheses that reached the length cap (3x the reference's tokens + 10; looping
hypotheses) and the WER of the others, since one loop can move a small set's WER by tens of points.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from whisper_rope import evaluate, load_model  # noqa: E402
from whisper_rope.experiments.report import wer_without_capped  # noqa: E402
from whisper_rope.training.config import FinetuneConfig  # noqa: E402
from whisper_rope.training.loop import finetune  # noqa: E402

EVAL_SPLITS = ("in-domain", "retained", "retained-festival")
LABEL_FREE = {"distill_only": True, "ce_weight": 0.0, "distill_weight": 0.0, "unpadded": True}

#: Route name -> FinetuneConfig overrides (None: evaluated without training). The budget (steps, batch, warm-up, the
#: fade / first-stage length) comes from the command line and is the same for every route; learning rates are each
#: route's own (the table keeps its sliced rows and needs only small updates; a rotary encoder must move its
#: attention much more), and the command line's --lr/--lr-positional replace them when given.
SLICED = {**LABEL_FREE, "variant": "whisper", "lr": 3e-5}
ROTARY = {**LABEL_FREE, "variant": "rotary/learned", "lr": 1e-4, "lr_positional": 3e-4}
ROUTES: Dict[str, Optional[Dict[str, Any]]] = {
    "source-padded": None,
    "sliced-zero-shot": None,
    "sliced-zero-shot-margin64": None,
    "sliced": {**SLICED, "distill_decoder_layers": 1.0},
    "sliced-encoder": {**SLICED, "distill_decoder_layers": 1.0, "distill_encoder_weight": 1.0},
    "hard-swap": {**ROTARY, "distill_decoder_layers": 1.0, "distill_encoder_weight": 1.0},
    "staged": {
        **ROTARY,
        "distill_decoder_layers": 1.0,
        "distill_encoder_weight": 1.0,
        "stage_policy": "positional-path",
    },
    "transplant": {**ROTARY, "transplant": True, "distill_decoder_layers": 1.0, "distill_encoder_weight": 1.0},
    "transplant-layers": {
        **ROTARY,
        "transplant": True,
        "distill_decoder_layers": 1.0,
        "distill_encoder_weight": 1.0,
        "distill_encoder_layers": 1.0,
    },
}


def evaluate_all(model, corpus: Path, unpadded: bool, limit: Optional[int]) -> Dict[str, Dict[str, Any]]:
    """WER, capped hypotheses, WER without them and real-time factor on every evaluation split."""
    results = {}
    for split in EVAL_SPLITS:
        manifest = corpus / f"{split}.jsonl"
        if not manifest.is_file():
            continue
        r = evaluate(model, manifest, batch_size=16, unpadded=unpadded, progress=False, limit=limit)
        results[split] = {
            "wer": r.wer,
            "capped": r.n_capped,
            "clips": r.n_utterances,
            "wer_without_capped": wer_without_capped(r),
            "rtf": r.rtf,
        }
    return results


def run_route(name: str, seed: int, args: argparse.Namespace, directory: Path) -> Dict[str, Any]:
    overrides = ROUTES[name]
    started = time.perf_counter()
    if overrides is None:
        model = load_model(
            args.model,
            device="cpu",
            unpadded=name != "source-padded",
            unpadded_margin=64 if name.endswith("margin64") else 0,
        )
        trained = None
    else:
        config = FinetuneConfig(
            model=args.model,
            train=str(args.train or args.corpus / "train.jsonl"),
            output=str(directory),
            steps=args.steps,
            batch_size=args.batch_size,
            warmup_steps=args.warmup,
            transplant_anneal_steps=args.bridge,
            stage_steps=args.bridge if "stage_policy" in overrides else 0,
            seed=seed,
            num_workers=1,
            device="cpu",
            threads=1,
            teacher_cache=args.teacher_cache,
            progress=args.progress,
            **{**overrides, **_given_rates(args)},
        )
        trained = finetune(config=config)
        model = trained.model
    run_seconds = time.perf_counter() - started
    evaluation = evaluate_all(model, args.corpus, unpadded=name != "source-padded", limit=args.eval_limit)
    steps = [r["seconds_per_step"] for r in trained.history if r["event"] == "train"] if trained else []
    return {
        "route": name,
        "seed": seed,
        "settings": _settings(args),
        "variant": model.variant,
        # the run's wall time with the teacher cache's filling; the optimizer steps' own time per step
        "run_seconds": round(run_seconds, 1) if trained else 0.0,
        "seconds_per_step": round(sum(steps) / len(steps), 3) if steps else None,
        "evaluation": evaluation,
    }


def _given_rates(args: argparse.Namespace) -> Dict[str, float]:
    """The learning rates given on the command line (they replace the routes' own)."""
    return {key: getattr(args, key) for key in ("lr", "lr_positional") if getattr(args, key) is not None}


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    keys = ("model", "train", "steps", "batch_size", "lr", "lr_positional", "warmup", "bridge", "eval_limit")
    return {key: getattr(args, key) for key in keys}


def _table(results: List[Dict[str, Any]]) -> str:
    header = "| route | seed | variant | " + " | ".join(f"{s} WER % (capped; WER without)" for s in EVAL_SPLITS)
    lines = [header + " | train s/step |", "|---" * (4 + len(EVAL_SPLITS)) + "|"]
    for r in results:
        cells = []
        for split in EVAL_SPLITS:
            e = r["evaluation"].get(split)
            if e is None:
                cells.append("–")
                continue
            without = "–" if e["wer_without_capped"] is None else f"{100 * e['wer_without_capped']:.1f}"
            cells.append(f"{100 * e['wer']:.1f} ({e['capped']}; {without})")
        step = "–" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
        lines.append(f"| {r['route']} | {r['seed']} | {r['variant']} | " + " | ".join(cells) + f" | {step} |")
    return "\n".join(lines)


def _plot(results: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['route']} (s{r['seed']})" for r in results]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.5))
    width = 0.8 / len(EVAL_SPLITS)
    for i, split in enumerate(EVAL_SPLITS):
        values = [100 * r["evaluation"].get(split, {}).get("wer", float("nan")) for r in results]
        ax.bar([x + i * width for x in range(len(results))], values, width, label=split)
    ax.set_xticks([x + width for x in range(len(results))], labels, rotation=30, ha="right")
    ax.set_ylabel("WER % (unpadded; source-padded on 30-s windows)")
    ax.set_ylim(0, min(100, ax.get_ylim()[1]))
    ax.legend()
    ax.set_title("Routes from tiny.en to unpadded decoding, one budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus of benchmarks/build_corpus.py")
    parser.add_argument("--out", type=Path, required=True, help="results folder (rerun: finished routes are kept)")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES), help="routes to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the training runs")
    parser.add_argument("--model", default="tiny.en", help="the source checkpoint (also the teacher)")
    parser.add_argument("--train", default=None, help="training audio (default: the corpus's train split)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every route")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: each route's own)")
    parser.add_argument(
        "--lr-positional", type=float, default=None, help="peak rate of the positional path (default: each route's)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    parser.add_argument("--bridge", type=int, default=100, help="transplant fade / staged first-stage steps")
    parser.add_argument("--teacher-cache", default=None, help="teacher target cache (default: whisper_rope's)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N clips of each split")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: redraw routes.md/png from every result.json in --out (runs of several invocations)",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        return _report(_stored_results(args.out), args.out)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.routes:
        for seed in args.seeds if ROUTES[name] is not None else [0]:
            directory = args.out / f"{name}-seed{seed}"
            path = directory / "result.json"
            if path.is_file():
                stored = json.loads(path.read_text())
                if stored.get("settings") == _settings(args):
                    results.append(stored)
                    continue
            if directory.is_dir() and any(directory.iterdir()):
                raise SystemExit(f"{directory} holds a run with other settings: remove it or choose another --out")
            directory.mkdir(parents=True, exist_ok=True)
            result = run_route(name, seed, args, directory)
            path.write_text(json.dumps(result, indent=2) + "\n")
            results.append(result)
            print(_table([result]).splitlines()[-1], flush=True)
    return _report(results, args.out)


def _stored_results(out: Path) -> List[Dict[str, Any]]:
    """Every route's result.json in ``out``, in the order of `ROUTES`, then by seed."""
    if not out.is_dir():
        raise SystemExit(f"--out {out}: no such results folder")
    results = [json.loads(path.read_text()) for path in out.glob("*/result.json")]
    if not results:
        raise SystemExit(f"--out {out}: no */result.json to report")
    order = {name: i for i, name in enumerate(ROUTES)}
    return sorted(results, key=lambda r: (order.get(r["route"], len(order)), r["seed"]))


def _report(results: List[Dict[str, Any]], out: Path) -> int:
    (out / "routes.md").write_text(_table(results) + "\n")
    _plot(results, out / "routes.png")
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
