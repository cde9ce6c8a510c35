"""Training throughput and peak memory: whisper_rope's variants against Hugging Face transformers, same batches.

Systems (tiny.en weights, the same batch of the committed speech fixtures every step):

* ``whisper-padded``: our ``whisper`` preset (upstream Whisper bit for bit) on 30-s windows, as upstream trains.
* ``hf-padded``: transformers' ``WhisperForConditionalGeneration`` with the same weights (written with
  ``whisper_rope.weights.huggingface.write_huggingface``), same windows, same decoder tokens, same loss.
* ``rotary-padded``: the ``rotary`` preset on 30-s windows (what RoPE itself costs).
* ``rotary-unpadded``: the ``rotary`` preset on each clip's own frames, zero-padded to the batch's longest with the
  frame counts masked, as ``whisper-rope finetune`` trains rotary encoders.
* ``rotary-unpadded-packed``: ``rotary-unpadded`` with the clips packed end to end and block-diagonal attention
  (``packed=True``, `whisper_rope.packing`; ``--packed_attention`` of ``finetune``): no padding computed, no mask.
* ``whisper-padded-ckpt``: ``whisper-padded`` with gradient checkpointing (memory for compute).

A step is forward, token cross-entropy, backward and an AdamW update; data loading is excluded (batches are built
once). Memory: each system alone in a fresh process for two steps (CPU: the process's peak resident set and its
growth over the pre-training baseline; CUDA: ``max_memory_allocated``), which also gives the first step's loss
(ours and Hugging Face's agree when both compute the same function). Speed: all systems in one process, one
warm-up step each, then ``--steps`` rounds in which every system takes one step in turn, so that load from other
processes hits them alike; reported: median seconds per step and audio seconds trained per wall second.

``--end-to-end`` adds ``whisper_rope.training.loop.finetune`` itself (rotary, unpadded, DataLoader workers decoding
audio), read from its own log.

Usage: ``python3 benchmarks/train_speed.py [--steps 3] [--batch-size 8] [--threads 2] [--device cpu]
[--systems whisper-padded,rotary-unpadded] [--end-to-end] [--json out.json]``. Install ``transformers`` for the
``hf-padded`` row (it is not a dependency of whisper_rope). ``--random-weights`` uses tiny.en's dimensions with
random weights (same speed; for machines without the model package).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEECH = ROOT / "tests" / "fixtures" / "speech"
SYSTEMS = (
    "whisper-padded",
    "hf-padded",
    "rotary-padded",
    "rotary-unpadded",
    "rotary-unpadded-packed",
    "whisper-padded-ckpt",
)
TINY_EN_DIMS = dict(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=384,
    n_audio_head=6,
    n_audio_layer=4,
    n_vocab=51864,
    n_text_ctx=448,
    n_text_state=384,
    n_text_head=6,
    n_text_layer=4,
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fp:
        return int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fp:
            model = next(line.split(":", 1)[1].strip() for line in fp if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def _manifest(folder: Path, batch_size: int) -> Path:
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]
    rows = (rows * (batch_size // len(rows) + 1))[:batch_size]
    path = folder / "clips.jsonl"
    path.write_text("".join(json.dumps({"audio": str(SPEECH / r["audio"]), "text": r["text"]}) + "\n" for r in rows))
    return path


def _load(variant: str, random_weights: bool):
    import torch

    import whisper_rope

    if random_weights:
        torch.manual_seed(0)
        return whisper_rope.build_model(TINY_EN_DIMS, variant)
    return whisper_rope.load_model("tiny.en", variant=variant, device="cpu")


class System:
    """One system ready to train: ``step()`` runs forward, loss, backward and the AdamW update; returns the loss."""

    def __init__(self, name: str, args: argparse.Namespace):
        import torch

        from whisper_rope.data import Collator, load_examples

        self.name = name
        self.device = torch.device(args.device)
        padded = not name.startswith("rotary-unpadded")
        model = _load("rotary" if name.startswith("rotary") else "whisper", args.random_weights)
        with tempfile.TemporaryDirectory() as folder:
            dataset = load_examples(_manifest(Path(folder), args.batch_size), model, pad_30s=padded)
            batch = Collator(dataset.tokenizer(0).eot, padded_30s=padded)([dataset[i] for i in range(len(dataset))])
        self.batch = batch.to(self.device)
        self.audio_seconds = sum(batch.seconds)
        if name == "hf-padded":
            from transformers import WhisperForConditionalGeneration

            from whisper_rope.weights.huggingface import write_huggingface

            with tempfile.TemporaryDirectory() as folder:
                hf_dir = Path(folder) / "hf"
                write_huggingface(model.dims_dict(), model.state_dict(), hf_dir, model.alignment_heads_dense())
                self.network = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
        else:
            self.network = model
        self.network.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-5)

    def logits(self):
        if self.name == "hf-padded":
            return self.network(input_features=self.batch.mel, decoder_input_ids=self.batch.tokens).logits
        packed = self.name == "rotary-unpadded-packed"
        return self.network(self.batch.mel, self.batch.tokens, self.batch.n_frames, packed=packed)

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        from whisper_rope.data import IGNORE_INDEX
        from whisper_rope.training.optim import gradient_checkpointing

        with gradient_checkpointing(self.network, enabled=self.name.endswith("-ckpt")):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.logits()
            labels = self.batch.labels.flatten()
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())


def memory_of(name: str, args: argparse.Namespace) -> dict:
    """Peak memory of one system alone in this (fresh) process, over a warm-up and one more step."""
    import torch

    system = System(name, args)
    baseline_mb = _current_rss_mb()
    if system.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first_loss = system.step()
    system.step()
    result = {
        "system": name,
        "first_step_loss": first_loss,
        "mel_frames": int(system.batch.mel.shape[-1]),
        "batch_audio_seconds": system.audio_seconds,
    }
    if system.device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mb"] = _peak_rss_mb()
        result["rss_growth_mb"] = _peak_rss_mb() - baseline_mb
    return result


def interleaved_timing(names: List[str], args: argparse.Namespace) -> Dict[str, List[tuple]]:
    """(wall seconds, CPU seconds of this process) per step of every system, its steps taken in turn (so that load
    from other processes hits all systems alike), after one warm-up step each."""
    systems = [System(name, args) for name in names]
    for system in systems:
        system.step()
    times: Dict[str, List[tuple]] = {name: [] for name in names}
    for _ in range(args.steps):
        for system in systems:
            started, cpu = time.perf_counter(), time.process_time()
            system.step()
            times[system.name].append((time.perf_counter() - started, time.process_time() - cpu))
    return times


def end_to_end(args: argparse.Namespace) -> dict:
    """``finetune`` itself on the rotary preset, unpadded, with DataLoader workers: throughput from its log."""
    from whisper_rope.training.config import FinetuneConfig
    from whisper_rope.training.loop import finetune

    model = _load("rotary", args.random_weights)
    with tempfile.TemporaryDirectory() as folder:
        manifest = _manifest(Path(folder), 8)
        config = FinetuneConfig(
            train=str(manifest),
            output=str(Path(folder) / "run"),
            steps=args.steps + 1,
            batch_size=args.batch_size if args.batch_size <= 8 else 8,
            lr=1e-5,
            warmup_steps=0,
            num_workers=2,
            log_every=1,
            progress=False,
            device=args.device,
            threads=args.threads,
        )
        result = finetune(model, config=config)
    rates = [r["audio_seconds_per_second"] for r in result.history if r.get("event") == "train"][1:]
    return {
        "system": "finetune-rotary-unpadded",
        "audio_seconds_per_second": statistics.median(rates),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _child(name: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    if args.random_weights:
        command.append("--random-weights")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"system": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results: List[dict], device: str) -> str:
    memory = "peak GPU MiB" if device.startswith("cuda") else "peak RSS MiB (growth)"
    lines = [
        f"| system | s/step | CPU s/step (process) | audio s / s | {memory} | first-step loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error']} | | | | |")
            continue
        if "peak_memory_mb" in r:
            mem = f"{r['peak_memory_mb']:.0f}"
        else:
            mem = f"{r['peak_rss_mb']:.0f}" + (f" ({r['rss_growth_mb']:.0f})" if "rss_growth_mb" in r else "")
        step = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        cpu = f"{r['cpu_seconds_per_step']:.2f}" if "cpu_seconds_per_step" in r else "-"
        loss = f"{r['first_step_loss']:.4f}" if "first_step_loss" in r else "-"
        lines.append(f"| {r['system']} | {step} | {cpu} | {r['audio_seconds_per_second']:.1f} | {mem} | {loss} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per system (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step (the 8 fixtures, repeated)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--end-to-end", action="store_true", help="also time finetune() with its data pipeline")
    parser.add_argument("--random-weights", action="store_true", help="tiny.en dimensions, random weights")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = end_to_end(args) if args.child == "end-to-end" else memory_of(args.child, args)
        print(json.dumps(result))
        return 0

    import torch

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    results = []
    for name in names + (["end-to-end"] if args.end_to_end else []):
        print(f"memory of {name} ...", file=sys.stderr, flush=True)
        results.append(_child(name, args))
    print("timing, steps interleaved ...", file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    times = interleaved_timing([r["system"] for r in results if "error" not in r and r["system"] in SYSTEMS], args)
    for result in results:
        if result["system"] in times:
            result["step_times"] = [wall for wall, _ in times[result["system"]]]
            result["step_cpu_times"] = [cpu for _, cpu in times[result["system"]]]
            result["seconds_per_step"] = statistics.median(result["step_times"])
            result["cpu_seconds_per_step"] = statistics.median(result["step_cpu_times"])
            result["audio_seconds_per_second"] = result["batch_audio_seconds"] / result["seconds_per_step"]
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    print(
        f"device: {args.device} ({hardware}); torch {torch.__version__}; threads {args.threads}; "
        f"batch {args.batch_size} clips; {args.steps} timed steps; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(_table(results, args.device))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
