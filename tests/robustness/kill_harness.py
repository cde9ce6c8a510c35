"""Kill -9 during fine-tuning, resume, repeat; then compare with an uninterrupted run.

A small random rotary model fine-tunes on the committed speech clips (tests/fixtures/speech/manifest.jsonl),
writing a checkpoint every step, in a child process. The harness SIGKILLs the child once it is inside a target
step (the targets spread over the run), alternately at a random moment of that step's training and the instant a
checkpoint write is seen in progress (a staging directory or temporary file in the output); after every kill it checks
that the latest checkpoint loads (both files, and the step they name) and resumes with ``--resume``. At the end the
final weights must equal those of a run that was never interrupted.

``--slow-writes S`` makes every fsync in the child sleep S seconds first (the child patches ``os.fsync``), widening
the window in which a kill lands inside a checkpoint write.

    python -m tests.robustness.kill_harness --kills 24 --steps 12 --work /tmp/kills   # prints a JSON report

`run_harness` is the same from Python (tests/robustness/test_kill_during_finetune.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from . import REPO, SPEECH, subprocess_env

MANIFEST = SPEECH / "manifest.jsonl"


@dataclass
class Kill:
    """One SIGKILL and what it left behind."""

    mode: str  # "random" (a random moment) or "in-write" (while a checkpoint write was seen in progress)
    delay_s: float  # after the child reported it was ready
    latest_step: Optional[int]  # step of the newest complete checkpoint afterwards (None: none yet)
    inside_write: bool  # a staging directory or temporary file was left: the kill interrupted a write
    leftovers: List[str]


@dataclass
class Report:
    kills: List[Kill] = field(default_factory=list)
    completed_before_kill: int = 0  # children that finished before their kill was due
    resumes: int = 0
    steps: int = 0
    exact: bool = False
    max_difference: float = 0.0
    straight_seconds: float = 0.0
    leftovers_at_end: List[str] = field(default_factory=list)

    def summary(self) -> str:
        inside = sum(k.inside_write for k in self.kills)
        return (
            f"robustness: kill -9 during fine-tuning: {len(self.kills)} kills ({inside} inside a checkpoint write, "
            f"{sum(k.mode == 'in-write' for k in self.kills)} aimed at one), {self.resumes} resumes, "
            f"{self.completed_before_kill} runs finished before their kill; every latest checkpoint loaded; "
            f"final weights {'identical to' if self.exact else 'DIFFERENT from'} the uninterrupted run "
            f"(max |difference| {self.max_difference:g}) after {self.steps} steps; temporary files left at the "
            f"end: {len(self.leftovers_at_end)}"
        )


def child_config(source: Path, output: Path, steps: int, resume: bool):
    """The run's settings: every step checkpointed, SpecAugment on (more random state to restore)."""
    from whisper_rope.training.config import FinetuneConfig

    return FinetuneConfig(
        model=str(source),
        train=str(MANIFEST),
        output=str(output),
        steps=steps,
        batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        spec_augment=True,
        num_workers=0,
        threads=1,
        progress=False,
        log_every=1,
        device="cpu",
        seed=0,
        save_every=1,
        keep_last=2,
        resume="" if resume else None,
    )


def _child_main(args: argparse.Namespace) -> int:
    """Run (or resume) the fine-tune in this process; print "ready" when about to start."""
    if args.slow_writes:
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(args.slow_writes)
            real_fsync(fd)

        os.fsync = slow_fsync
    from whisper_rope.training.loop import finetune

    config = child_config(Path(args.source), Path(args.output), args.steps, args.resume)
    print("ready", flush=True)
    finetune(config=config)
    return 0


def _start_child(work: Path, output: Path, steps: int, resume: bool, slow_writes: float) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "tests.robustness.kill_harness",
        "child",
        "--source",
        str(work / "source.pt"),
        "--output",
        str(output),
        "--steps",
        str(steps),
        "--slow-writes",
        str(slow_writes),
    ]
    if resume:
        command.append("--resume")
    child = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = child.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"the training child did not start: {line!r} {child.communicate()[1][-2000:]}")
    return child


def _finish(child: subprocess.Popen) -> None:
    _, err = child.communicate(timeout=600)
    if child.returncode != 0:
        raise RuntimeError(f"the training child failed with status {child.returncode}: {err[-3000:]}")


def _writes_in_progress(output: Path) -> List[str]:
    """Staging directories and temporary files: traces of a checkpoint write under way (or interrupted)."""
    if not output.is_dir():
        return []
    found = [p.name for p in output.iterdir() if p.name.endswith((".partial", ".tmp"))]
    for staging in output.glob(".step-*.partial"):
        found += [f"{staging.name}/{p.name}" for p in staging.iterdir()] if staging.is_dir() else []
    return sorted(found)


def _log_signature(output: Path) -> Optional[Tuple[int, int]]:
    """(inode, size) of the training log: it changes when a run begins training (a fresh run starts a new log, a
    resumed one appends its "start" record), and not while the run is still loading."""
    try:
        stat = (output / "train_log.jsonl").stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size


def _latest_step(output: Path) -> int:
    from whisper_rope.training.state import latest_checkpoint

    latest = latest_checkpoint(output)
    return int(latest.name.split("-")[1]) if latest is not None else 0


def check_latest(output: Path) -> Optional[int]:
    """Load the newest complete checkpoint (and the final model, if written); return its step."""
    import torch

    from whisper_rope import load_model
    from whisper_rope.training.state import MODEL_FILE, STATE_FILE, latest_checkpoint

    latest = latest_checkpoint(output)
    if (output / MODEL_FILE).exists():
        load_model(output / MODEL_FILE, device="cpu")
    if latest is None:
        return None
    step = int(latest.name.split("-")[1])
    load_model(latest / MODEL_FILE, device="cpu")
    state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
    if int(state["step"]) != step:
        raise AssertionError(f"{latest} holds the training state of step {state['step']}")
    return step


def run_harness(work: Path, kills: int, steps: int, seed: int = 0, slow_writes: float = 0.0) -> Report:
    """Straight run, then a run killed ``kills`` times and resumed after each; compare final weights."""
    import torch
    from whisper.model import ModelDimensions

    from whisper_rope import build_model, save_checkpoint
    from whisper_rope.training.state import MODEL_FILE, latest_checkpoint
    from whisper_rope.weights.format import read_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=24,
        n_audio_state=64,
        n_audio_head=4,
        n_audio_layer=2,
        n_vocab=51864,
        n_text_ctx=32,
        n_text_state=64,
        n_text_head=4,
        n_text_layer=2,
    )
    save_checkpoint(build_model(dims, "rotary"), work / "source.pt")
    report = Report(steps=steps)

    straight = _start_child(work, work / "straight", steps, False, slow_writes)
    started = time.perf_counter()  # from "ready": loading, setup and the steps, without the interpreter's start
    reached = []  # when each step's checkpoint appeared
    while straight.poll() is None:
        if _latest_step(work / "straight") > len(reached):
            reached.append(time.perf_counter())
        time.sleep(0.001)
    _finish(straight)
    report.straight_seconds = time.perf_counter() - started
    intervals = sorted(b - a for a, b in zip(reached, reached[1:]))
    seconds_per_step = intervals[len(intervals) // 2] if intervals else report.straight_seconds / steps

    rng = random.Random(seed)
    output = work / "killed"
    finished = False
    for number in range(kills):
        target = 1 + number * steps // kills  # the step this kill aims at: the kills are spread over the run
        resume = latest_checkpoint(output) is not None
        child = _start_child(work, output, steps, resume, slow_writes)
        report.resumes += resume
        mode = "in-write" if number % 2 == 0 else "random"
        ready = time.perf_counter()
        stale = set(_writes_in_progress(output))  # left by the previous kill, until the child sweeps them
        log_before = _log_signature(output)
        due = None  # set once the child trains (past loading and setup) inside the target step
        while child.poll() is None:
            if due is None and _log_signature(output) != log_before and _latest_step(output) >= target - 1:
                due = time.perf_counter() + rng.uniform(0.0, seconds_per_step)
            if due is not None and (
                set(_writes_in_progress(output)) - stale if mode == "in-write" else time.perf_counter() >= due
            ):
                break
            time.sleep(0.001)
        if child.poll() is not None:
            _finish(child)
            report.completed_before_kill += 1
            finished = True
            break
        child.send_signal(signal.SIGKILL)
        child.wait()
        delay = time.perf_counter() - ready
        leftovers = _writes_in_progress(output)
        latest = check_latest(output)
        report.kills.append(Kill(mode, round(delay, 3), latest, bool(leftovers), leftovers))

    if not finished:  # as a user would: resume until a run exits normally
        report.resumes += latest_checkpoint(output) is not None
        _finish(_start_child(work, output, steps, latest_checkpoint(output) is not None, slow_writes))
    check_latest(output)
    report.leftovers_at_end = _writes_in_progress(output)

    expected = read_checkpoint(work / "straight" / MODEL_FILE)["model_state_dict"]
    resumed = read_checkpoint(output / MODEL_FILE)["model_state_dict"]
    report.exact = expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    report.max_difference = max(float((expected[k].float() - resumed[k].float()).abs().max()) for k in expected)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="internal: one training process")
    child.add_argument("--source", required=True)
    child.add_argument("--output", required=True)
    child.add_argument("--steps", type=int, required=True)
    child.add_argument("--resume", action="store_true")
    child.add_argument("--slow-writes", type=float, default=0.0)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the run (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and of the kill times")
    parser.add_argument("--slow-writes", type=float, default=0.0, help="seconds each fsync sleeps in the child")
    parser.add_argument("--work", type=Path, required=False, help="working directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.command == "child":
        return _child_main(args)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="kill-harness-"))
    report = run_harness(work, args.kills, args.steps, args.seed, args.slow_writes)
    print(json.dumps(asdict(report), indent=1))
    print(report.summary())
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
