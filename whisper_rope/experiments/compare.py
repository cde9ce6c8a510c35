"""Side-by-side experiments: fine-tune one source checkpoint into several variants under identical settings and
report adaptation, forgetting and cost.

``whisper-rope compare --model tiny.en --runs whisper rotary rotary@distill --train train.jsonl
--eval in-domain=in.jsonl --eval retained=ret.jsonl --steps 200 --seeds 0 1 --output cmp`` (or ``--config cmp.json``
with the same keys) does, in order:

1. evaluates the source model as it is (the "before" row) on every evaluation set;
2. fine-tunes each run (a variant, optionally with self-distillation or a positional transplant) for every seed,
   with the same data, steps, learning rate and batch size, through `whisper_rope.training.loop.finetune`;
3. evaluates each fine-tuned model on every set: 30-s padded, and also unpadded for encoders without a table;
4. writes ``results.csv`` (one row per run, seed, set and decoding), ``results.md`` (mean ± std over seeds, and per
   set a table of WER per clip length, a row per length bucket) and PNG plots: WER per set before/after,
   training-loss curves overlaid, and training cost per run.

A run spec is ``VARIANT`` or ``VARIANT@FLAG[,FLAG]`` with flags ``distill``, ``transplant`` and ``unpadded`` (a
transplant that trains on unpadded input once the tables are gone). Every finished run leaves
``runs/<run>-seed<N>-<key>/result.json`` holding the settings that produced it (``key`` hashes the training settings):
a comparison run again with the same settings skips the finished runs and resumes an interrupted one; with other
training settings it trains anew beside the old runs, with other evaluation settings (sets, batch, cap) it evaluates
the stored models again. The reports show only the results of the settings given.
"""

import csv
import hashlib
import io
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import whisper

from ..evaluation.evaluate import CAP_FACTOR, EvaluationOptions, evaluate
from ..evaluation.metrics import length_bucket_table
from ..fields import BATCH, SEED, Bounds, NamedPath, PathText, check_bounds, opt
from ..fs.atomic import atomic_write, atomic_write_text
from ..fs.files import user_path
from ..fs.outputs import claim_directory, refuse_overlap, temporary_of
from ..training.config import FinetuneConfig
from ..training.loop import finetune
from ..training.state import step_checkpoints
from ..variants import parse_variant
from ..weights.loading import DEVICE_HELP, load_model

RUN_FLAGS = ("distill", "transplant", "unpadded")
#: `CompareConfig` fields that decide what a run trains (with its spec and seed), and what an evaluation measures.
TRAINING_SETTINGS = ("model", "train", "steps", "lr", "batch_size", "warmup_steps", "transplant_fraction")
EVALUATION_SETTINGS = ("eval_batch_size", "cap_factor")
#: `CompareConfig` fields that every run's `FinetuneConfig` takes as they are.
FINETUNE_SETTINGS = ("model", "train", "steps", "lr", "batch_size", "warmup_steps", "device", "threads", "num_workers",
                     "progress")  # fmt: skip
#: Every name `compare` writes into its --output.
COMPARE_FILES = ("config.json", "before.json", "runs", "results.csv", "results.md", "wer_per_set.png",
                 "loss_curves.png", "cost.png")  # fmt: skip


def finetune_option(name: str) -> Any:
    """A `CompareConfig` field declared as `FinetuneConfig`'s field ``name``: one default, one help text, one meaning
    for the option in ``finetune`` and ``compare``."""
    declared = next(f for f in fields(FinetuneConfig) if f.name == name)
    return field(default=declared.default, metadata=declared.metadata)


@dataclass(frozen=True)
class RunSpec:
    """One row of the comparison: a variant and how it is trained."""

    variant: str
    distill: bool = False
    transplant: bool = False
    unpadded: bool = False

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        variant, _, flags = text.partition("@")
        names = [f.strip() for f in flags.split(",") if f.strip()]
        unknown = [f for f in names if f not in RUN_FLAGS]
        if unknown:
            raise ValueError(f"run {text!r}: unknown flag {unknown[0]!r}; flags are {', '.join(RUN_FLAGS)}")
        parse_variant(variant)
        if "unpadded" in names and "transplant" not in names:
            raise ValueError(
                f"run {text!r}: the unpadded flag belongs to transplant runs (rotary encoders train unpadded anyway)"
            )
        return cls(variant.strip(), "distill" in names, "transplant" in names, "unpadded" in names)

    @property
    def label(self) -> str:
        extras = [name for name in RUN_FLAGS if getattr(self, name)]
        return self.variant + (f" ({', '.join(extras)})" if extras else "")

    @property
    def slug(self) -> str:
        name = re.sub(r"[^A-Za-z0-9+-]+", "_", parse_variant(self.variant).name)
        return name + "".join(f"-{flag}" for flag in RUN_FLAGS if getattr(self, flag))


@dataclass
class CompareConfig:
    """A comparison; each field is a ``whisper-rope compare`` option and a key of its ``--config`` JSON file."""

    model: PathText = opt("tiny.en", "source checkpoint (name or path)")
    runs: List[str] = opt(
        ["whisper", "rotary"],
        "runs to compare: VARIANT or VARIANT@FLAGS, FLAGS a comma-separated subset of distill, transplant, "
        "unpadded (with transplant)",
        nargs="+",
    )
    train: Optional[PathText] = opt(
        None, "training manifest or folder of audio files with .txt transcripts (the same for every run)"
    )
    eval: List[NamedPath] = opt(
        [],
        "evaluation sets as NAME=MANIFEST (a manifest or a folder of audio files with .txt transcripts), "
        "e.g. in-domain=in.jsonl retained=ret.jsonl",
        nargs="+",
    )
    output: PathText = opt(
        "compare-output",
        "output directory: the reports, and each run's fine-tune in runs/; new, empty or an earlier comparison's",
        flags=["-o"],
    )
    steps: int = finetune_option("steps")
    lr: float = finetune_option("lr")
    batch_size: int = finetune_option("batch_size")
    warmup_steps: Optional[int] = finetune_option("warmup_steps")
    seeds: List[int] = opt(
        [0],
        "seeds; each run is trained once per seed (two or more give mean ± std)",
        nargs="+",
        type=int,
        bounds=SEED,
    )
    eval_batch_size: int = opt(16, "clips decoded together in evaluation", bounds=BATCH)
    cap_factor: float = opt(3.0, "cap hypotheses at this many times the reference tokens", bounds=CAP_FACTOR)
    transplant_fraction: float = opt(
        0.5,
        "transplant runs anneal the tables and open the gates over this fraction of the steps",
        bounds=Bounds.reals(0, 1, low_open=True),
    )
    device: Optional[str] = opt(None, DEVICE_HELP)
    threads: int = finetune_option("threads")
    num_workers: int = finetune_option("num_workers")
    progress: bool = opt(True, "show progress bars")

    def run_specs(self) -> List[RunSpec]:
        return [RunSpec.parse(text) for text in self.runs]

    def eval_sets(self) -> Dict[str, str]:
        sets = {}
        for item in self.eval:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"evaluation set {item!r}: expected NAME=MANIFEST")
            sets[name] = path
        return sets

    def validate(self) -> "CompareConfig":
        """Check every setting and that every input exists, before anything is written."""
        check_bounds(self)
        if not self.train:
            raise ValueError("compare needs a training manifest (--train)")
        if not self.eval_sets():
            raise ValueError("compare needs at least one evaluation set (--eval NAME=MANIFEST)")
        if not _exists(self.model) and self.model not in whisper.available_models():
            raise ValueError(f"--model {self.model!r} is neither an existing path nor a model name")
        if not _exists(self.train):
            raise ValueError(f"--train {self.train!r} does not exist (expected a manifest or a folder of audio)")
        for name, path in self.eval_sets().items():
            if not _exists(path):
                raise ValueError(f"--eval {name}={path}: {path!r} does not exist (expected a manifest or a folder)")
        if not self.runs or not self.seeds:
            raise ValueError("compare needs at least one run and one seed")
        self.run_specs()
        FinetuneConfig(**{name: getattr(self, name) for name in FINETUNE_SETTINGS}, output=self.output).validate()
        return self


def _evaluation_options(config: CompareConfig, unpadded: bool) -> EvaluationOptions:
    # fp32 decoding everywhere, so that CPU and GPU comparisons decode alike.
    return EvaluationOptions(
        batch_size=config.eval_batch_size,
        cap_factor=config.cap_factor,
        unpadded=unpadded,
        skip_invalid=True,
        fp16=False,
    )


def _decodings(model) -> List[Tuple[str, bool]]:
    """padded always; unpadded too when the encoder takes it as loaded (no absolute table, or trained unpadded with
    its table sliced)."""
    return [("padded", False)] + ([("unpadded", True)] if not model.encoder.needs_full_window else [])


def _evaluate_all(model, config: CompareConfig) -> List[Dict[str, Any]]:
    rows = []
    for set_name, manifest in config.eval_sets().items():
        for decoding, unpadded in _decodings(model):
            result = evaluate(model, manifest, _evaluation_options(config, unpadded), progress=config.progress)
            rows.append(
                {
                    "set": set_name,
                    "decoding": decoding,
                    "wer": result.wer,
                    "cer": result.cer,
                    "n_capped": result.n_capped,
                    "rtf": result.rtf,
                    "n_utterances": result.n_utterances,
                    "buckets": [asdict(bucket) for bucket in result.buckets],
                }
            )
    return rows


def _finetune_config(config: CompareConfig, spec: RunSpec, seed: int, output: Path):
    options = {name: getattr(config, name) for name in FINETUNE_SETTINGS}
    options.update(variant=spec.variant, output=str(output), seed=seed, distill=spec.distill)
    if spec.transplant:
        span = max(1, int(config.steps * config.transplant_fraction))
        options.update(
            transplant=True, transplant_anneal_steps=span, transplant_gate_steps=span, transplant_unpadded=spec.unpadded
        )
    if step_checkpoints(output):  # a comparison interrupted while this run trained: continue it
        options.update(resume=str(output))
    return FinetuneConfig(**options)


def run_one(config: CompareConfig, spec: RunSpec, seed: int, directory: Path) -> Dict[str, Any]:
    """Fine-tune and evaluate one run; writes ``result.json`` last (the run's completion mark), holding the settings
    that produced it (`training_settings`, `evaluation_settings`)."""
    started = time.perf_counter()
    trained = finetune(config=_finetune_config(config, spec, seed, directory / "train"))
    train_seconds = time.perf_counter() - started
    model = load_model(trained.model_path, device=config.device, progress=config.progress)
    model.eval()
    result = {
        "run": spec.label,
        "slug": spec.slug,
        "variant": model.variant,
        "distill": spec.distill,
        "transplant": spec.transplant,
        "unpadded_phase": spec.unpadded,
        "seed": seed,
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(trained.steps, 1),
        "model_path": str(trained.model_path),
        "settings": training_settings(config, spec, seed),
        "evaluation_settings": evaluation_settings(config),
        "evaluations": _evaluate_all(model, config),
    }
    atomic_write_text(directory / "result.json", json.dumps(result, indent=2))
    return result


def _as_given(value: str) -> str:
    """A path option as a key: the real absolute path of an existing file, else the text (a model name)."""
    return os.path.realpath(user_path(value)) if _exists(value) else value


def _exists(value: Optional[str]) -> bool:
    return bool(value) and user_path(value).exists()


def training_settings(config: CompareConfig, spec: RunSpec, seed: int) -> Dict[str, Any]:
    """Everything that decides what a run trains: a stored run is reused only when these are equal."""
    settings = {key: getattr(config, key) for key in TRAINING_SETTINGS}
    settings.update(model=_as_given(config.model), train=_as_given(config.train), run=spec.label, seed=seed)
    if not spec.transplant:
        del settings["transplant_fraction"]
    return settings


def evaluation_settings(config: CompareConfig) -> Dict[str, Any]:
    """Everything that decides what an evaluation measures: stored evaluations are reused only when these are
    equal (a renamed or changed set is evaluated again)."""
    sets = {name: _as_given(path) for name, path in config.eval_sets().items()}
    return {"eval": sets, **{key: getattr(config, key) for key in EVALUATION_SETTINGS}}


def _run_directory(output: Path, spec: RunSpec, seed: int, settings: Dict[str, Any]) -> Path:
    """``runs/<slug>-seed<N>-<key>``: the key (a hash of the training settings) keeps other settings' runs apart."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return output / "runs" / f"{spec.slug}-seed{seed}-{key}"


def _stored(path: Path) -> Optional[Dict[str, Any]]:
    """A result this command wrote earlier, or None (absent or unreadable: it is computed again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_result(config: CompareConfig, spec: RunSpec, seed: int, output: Path) -> Dict[str, Any]:
    """The stored result of a run with exactly these settings, evaluated again if the evaluation settings changed;
    else a new run."""
    settings = training_settings(config, spec, seed)
    directory = _run_directory(output, spec, seed, settings)
    stored = _stored(directory / "result.json")
    if stored is None or stored.get("settings") != settings:
        return run_one(config, spec, seed, directory)
    if stored.get("evaluation_settings") != evaluation_settings(config):
        model = load_model(stored["model_path"], device=config.device, progress=config.progress).eval()
        stored.update(evaluation_settings=evaluation_settings(config), evaluations=_evaluate_all(model, config))
        atomic_write_text(directory / "result.json", json.dumps(stored, indent=2))
    return stored


def _before(config: CompareConfig, output: Path) -> Dict[str, Any]:
    """The source model's evaluations (``before.json``), reused only for the same model and evaluation settings."""
    path = output / "before.json"
    stored = _stored(path)
    key = {"model": _as_given(config.model), "evaluation_settings": evaluation_settings(config)}
    if stored is not None and all(stored.get(name) == value for name, value in key.items()):
        return stored
    model = load_model(config.model, device=config.device, progress=config.progress).eval()
    result = {"run": "before (source model)", "variant": model.variant, **key}
    result["evaluations"] = _evaluate_all(model, config)
    atomic_write_text(path, json.dumps(result, indent=2))
    return result


def _compare_entry(name: str) -> bool:
    """Whether ``name`` is something `compare` writes into its --output."""
    return name in COMPARE_FILES or temporary_of(name, COMPARE_FILES)


def _earlier_comparison(output: Path) -> bool:
    """Whether an unmarked ``output`` (written before outputs were marked) is a comparison: its config.json holds
    compare settings, not a file of the same name that someone else wrote."""
    stored = _stored(output / "config.json")
    return stored is not None and "runs" in stored and set(stored) <= {f.name for f in fields(CompareConfig)}


def compare(config: CompareConfig) -> Dict[str, Any]:
    """Run (or resume) a comparison; returns {"before": ..., "runs": [...]} and writes the reports.

    Inputs are checked before anything is written; --output is claimed and locked (`claim_directory`). Every stored
    result is keyed by the settings that produced it: a run is reused only when its training settings are equal,
    its evaluations only when the evaluation settings are too; the reports show only this configuration's results.
    """
    config.validate()
    threads = torch.get_num_threads()
    if config.threads > 0:  # the evaluations' threads; each fine-tune sets (and restores) its own
        torch.set_num_threads(config.threads)
    try:
        return _compare(config)
    finally:
        torch.set_num_threads(threads)


def _compare(config: CompareConfig) -> Dict[str, Any]:
    output = user_path(config.output)
    inputs = {"--model": config.model, "--train": config.train}
    refuse_overlap(output, {**inputs, **{f"--eval {n}": p for n, p in config.eval_sets().items()}}, "--output")
    adopt = _earlier_comparison(output)
    with claim_directory(output, "compare", "--output", _compare_entry, adopt_unmarked=adopt):
        atomic_write_text(output / "config.json", json.dumps(asdict(config), indent=2))
        results = {"before": _before(config, output), "runs": []}
        for spec in config.run_specs():
            for seed in config.seeds:
                results["runs"].append(_run_result(config, spec, seed, output))
        write_reports(results, config, output)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Reports


def _rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for evaluation in results["before"]["evaluations"]:
        rows.append(
            {
                "run": results["before"]["run"],
                "variant": results["before"]["variant"],
                "seed": "",
                "steps": 0,
                "train_seconds": 0.0,
                "seconds_per_step": "",
                "final_loss": "",
                **evaluation,
            }
        )
    for run in results["runs"]:
        for evaluation in run["evaluations"]:
            rows.append(
                {
                    key: run[key]
                    for key in ("run", "variant", "seed", "steps", "train_seconds", "seconds_per_step", "final_loss")
                }
                | evaluation
            )
    return rows


def _mean_std(values: Sequence[float]) -> str:
    values = [100 * v for v in values]
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def results_table(results: Dict[str, Any], config: CompareConfig) -> str:
    """Markdown: one line per run and decoding, WER (%) per evaluation set (mean ± std over seeds), and cost."""
    sets = list(config.eval_sets())
    header = ["run", "decoding"] + [f"{name} WER %" for name in sets] + ["train s/step", "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: Dict[Tuple[str, str], Dict[str, List]] = {}
    order: List[Tuple[str, str]] = []
    for row in _rows(results):
        key = (row["run"], row["decoding"])
        if key not in groups:
            groups[key] = {"wer": {name: [] for name in sets}, "cost": [], "loss": []}
            order.append(key)
        groups[key]["wer"][row["set"]].append(row["wer"])
        if row["seconds_per_step"] != "":
            groups[key]["cost"].append(float(row["seconds_per_step"]))
            if row["final_loss"] not in ("", None):
                groups[key]["loss"].append(float(row["final_loss"]))
    for run, decoding in order:
        group = groups[(run, decoding)]
        cells = [run, decoding] + [_mean_std(group["wer"][name]) if group["wer"][name] else "" for name in sets]
        cost = statistics.mean(group["cost"]) if group["cost"] else None
        loss = statistics.mean(group["loss"]) if group["loss"] else None
        cells += [f"{cost:.2f}" if cost is not None else "–", f"{loss:.3f}" if loss is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def length_bucket_tables(results: Dict[str, Any], config: CompareConfig) -> str:
    """Markdown: per evaluation set, a row per clip-length bucket and, per run and decoding, its WER (%) and capped
    hypotheses (both means over seeds). Evaluations stored before buckets were reported have no column."""
    sections = []
    for set_name in config.eval_sets():
        columns: Dict[str, List[List[Dict[str, Any]]]] = {}
        for row in _rows(results):
            if row["set"] == set_name and row.get("buckets"):
                columns.setdefault(f"{row['run']} {row['decoding']}", []).append(row["buckets"])
        if columns:
            merged = {name: _mean_buckets(seeds) for name, seeds in columns.items()}
            sections += [f"WER per clip length on `{set_name}`:", "", length_bucket_table(merged), ""]
    return "\n".join(sections)


def _mean_buckets(seeds: Sequence[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One run's buckets averaged over its seeds: WER (of the seeds with words) and capped hypotheses."""
    grouped: Dict[str, List[Dict[str, Any]]] = {}
    for buckets in seeds:
        for bucket in buckets:
            grouped.setdefault(bucket["bucket"], []).append(bucket)
    merged = []
    for group in grouped.values():
        wers = [bucket["wer"] for bucket in group if bucket["wer"] is not None]
        merged.append(
            {
                **group[0],
                "wer": statistics.mean(wers) if wers else None,
                "n_capped": statistics.mean(bucket["n_capped"] for bucket in group),
            }
        )
    return merged


def write_reports(results: Dict[str, Any], config: CompareConfig, output: Path) -> List[Path]:
    rows = _rows(results)
    columns = [
        "run",
        "variant",
        "seed",
        "set",
        "decoding",
        "wer",
        "cer",
        "n_capped",
        "n_utterances",
        "rtf",
        "steps",
        "train_seconds",
        "seconds_per_step",
        "final_loss",
    ]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write_text(output / "results.csv", table.getvalue())
    seeds = ", ".join(str(s) for s in config.seeds)
    markdown = [
        f"# Comparison: {config.model}, {config.steps} steps, lr {config.lr:g}, batch {config.batch_size}, "
        f"seeds {seeds}",
        "",
        f"Training manifest `{config.train}`; evaluation sets: "
        + ", ".join(f"`{name}` ({path})" for name, path in config.eval_sets().items())
        + f". Greedy decoding, capped at {config.cap_factor:g}× the reference tokens + 10. WER in %, mean ± std over "
        "seeds; `unpadded` rows feed each clip's own frames (encoders without an absolute table).",
        "",
        results_table(results, config),
        "",
        length_bucket_tables(results, config),
        "![WER per set](wer_per_set.png) ![training loss](loss_curves.png) ![cost](cost.png)",
        "",
    ]
    md_path = atomic_write_text(output / "results.md", "\n".join(markdown))
    return [csv_path, md_path] + plot_results(results, config, output)


def _save_figure(figure, path: Path) -> Path:
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))


def plot_results(results: Dict[str, Any], config: CompareConfig, output: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(config.eval_sets())
    labels, values = [], {name: [] for name in sets}
    keyed: Dict[str, Dict[str, List[float]]] = {}
    for row in _rows(results):
        label = f"{row['run']}\n{row['decoding']}"
        keyed.setdefault(label, {name: [] for name in sets})[row["set"]].append(100 * row["wer"])
    for label, per_set in keyed.items():
        labels.append(label)
        for name in sets:
            values[name].append(statistics.mean(per_set[name]) if per_set[name] else math.nan)

    figure, axes = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 5))
    width = 0.8 / len(sets)
    for i, name in enumerate(sets):
        axes.bar([x + i * width for x in range(len(labels))], values[name], width, label=name)
    axes.set_xticks(
        [x + width * (len(sets) - 1) / 2 for x in range(len(labels))], labels, fontsize=7, rotation=35, ha="right"
    )
    axes.set(ylabel="WER (%)", title="WER per evaluation set, before and after fine-tuning")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    wer_path = _save_figure(figure, output / "wer_per_set.png")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in results["runs"]:
        log = Path(run["model_path"]).parent / "train_log.jsonl"
        if not log.is_file():
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("event") == "train" and isinstance(r.get("loss"), (int, float))]
        axes.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{run['run']} seed {run['seed']}")
    axes.set(xlabel="step", ylabel="training loss (cross-entropy per token)", title="training loss")
    axes.legend(fontsize=7)
    figure.tight_layout()
    loss_path = _save_figure(figure, output / "loss_curves.png")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4))
    names = [f"{run['run']} s{run['seed']}" for run in results["runs"]]
    axes.barh(names, [run["seconds_per_step"] for run in results["runs"]])
    axes.set(xlabel="wall seconds per training step", title="training cost per run")
    figure.tight_layout()
    cost_path = _save_figure(figure, output / "cost.png")
    plt.close(figure)
    return [wer_path, loss_path, cost_path]
