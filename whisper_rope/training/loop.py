"""Fine-tuning pretrained Whisper checkpoints into any positional variant.

``finetune(model, train, eval, config)`` is the Python API; ``whisper-rope finetune`` builds its options from the
fields of `FinetuneConfig` (`add_finetune_arguments`, `config_from_args`, `run_finetune_cli`), so the two cannot
drift. Under ``torchrun`` the same code trains with DistributedDataParallel.

Output directory::

    model.pt                 the final model, our checkpoint format (``whisper_rope.load_model`` reads it)
    step-0000500/            every --save-every steps and at the end; the last --keep-last are kept
        model.pt             the model at that step
        training_state.pt    optimizer, LR scheduler, grad scaler, step, RNG states, sampler position, config
    best/model.pt            the model with the lowest evaluation WER so far (best/metrics.json says which)
    train_log.jsonl          every logged metric, one JSON object per line
    training_curves.png      loss and WER curves, drawn at the end

Every file is written atomically (a temporary file, fsynced, renamed), and a step directory only appears once both
of its files are complete, so a crash at any moment leaves the previous checkpoint loadable. Every ``.pt`` file
holds only tensors and plain data: ``torch.load(path, weights_only=True)`` reads it.

Batch sizes: ``batch_size`` is the *global* number of clips per forward pass (split evenly over the processes);
one optimizer step uses ``batch_size * grad_accum`` clips. The loss is the mean over the target tokens of each
global forward batch, so a run gives the same updates on one process or several.
"""

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from whisper.decoding import DecodingOptions

from ..atomic import atomic_torch_save, atomic_write_text
from ..data import (
    IGNORE_INDEX,
    Batch,
    BucketBatchSampler,
    SpeechDataset,
    load_examples,
    make_loader,
    pad_token_rows,
    spec_augment_,
    target_sequence,
)
from ..errors import PathLike, TrainingError, WhisperRopeError
from ..evaluation.evaluate import validation_metrics
from ..features import audio_position_mask
from ..model import WhisperRope
from ..options import add_dataclass_arguments, dataclass_from_args, standalone_main
from ..weights.format import read_checkpoint
from ..weights.loading import checkpoint_dict, load_model
from .config import BOOKKEEPING, FinetuneConfig
from .distributed import DistributedContext, from_environment
from .log import TrainingLog, jsonable, plot_curves
from .state import (  # the step-directory helpers are part of this module's API too
    MODEL_FILE,
    STATE_FILE,
    latest_checkpoint,  # noqa: F401
    read_training_state,
    resolve_resume,
    restore_entry,
    rng_state,
    save_step_checkpoint,
    set_rng_state,
    step_checkpoints,
    sweep_temporary_files,
)
from .transplant import (
    TRANSPLANT_VARIANT,
    TransplantSchedule,
    apply_schedule,
    check_transplant_model,
    finalize_transplant,
)

logger = logging.getLogger("whisper_rope")

LOG_FILE = "train_log.jsonl"
CURVES_FILE = "training_curves.png"


@dataclass
class FinetuneResult:
    """What a run produced. ``history`` holds every logged record (as in ``train_log.jsonl``)."""

    model: WhisperRope
    steps: int
    output: Path
    model_path: Optional[Path]
    checkpoint: Optional[Path]
    final_loss: Optional[float]
    best_wer: Optional[float]
    best_step: Optional[int]
    history: List[Dict[str, Any]]
    skipped_rows: Dict[str, List[str]]


# --------------------------------------------------------------------------------------------------------------------
# Parameters, optimizer, schedule


def select_trainable(model: WhisperRope, policy: str) -> List[str]:
    """Set ``requires_grad`` by the train policy; returns the names of the trainable parameters.

    Policies: ``all``; ``positional`` (positional tables, rotary gates, and every self- and cross-attention
    projection); ``decoder``; ``encoder``; otherwise a regular expression searched in each parameter name.
    Parameters the checkpoint did not provide (``model.load_report.initialised``) and rotary gates always train.
    """
    report = getattr(model, "load_report", None)
    new = set(report.initialised) if report is not None else set()
    names = []
    for name, parameter in model.named_parameters():
        if policy == "all":
            chosen = True
        elif policy == "positional":
            chosen = "positional_embedding" in name or ".attn." in name or ".cross_attn." in name
        elif policy in ("decoder", "encoder"):
            chosen = name.startswith(policy + ".")
        else:
            chosen = re.search(policy, name) is not None
        chosen = chosen or name in new or name.endswith("rotary_gate")
        parameter.requires_grad_(chosen)
        if chosen:
            names.append(name)
    if not names:
        raise ValueError(f"--train-policy {policy!r} selects no parameter of the model")
    return names


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay on matrices (ndim >= 2) only."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine/linear to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _precision(config: FinetuneConfig, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None for fp32, whether to use a GradScaler)."""
    if device.type != "cuda":
        if config.precision in ("bf16", "fp16"):
            raise ValueError(f"--precision {config.precision} needs a CUDA device; the CPU trains in fp32")
        return None, False
    if config.precision == "fp32":
        return None, False
    if config.precision == "bf16" or (config.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


@contextlib.contextmanager
def gradient_checkpointing(model: WhisperRope, enabled: bool = True) -> Iterator[None]:
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


class _Student(nn.Module):
    """The model's forward returning logits and (optionally) encoder outputs, as one module for DDP."""

    def __init__(self, model: WhisperRope):
        super().__init__()
        self.model = model

    def forward(self, mel: Tensor, tokens: Tensor, n_frames: Optional[Tensor], with_audio: bool = False):
        audio = self.model.encoder(mel, n_frames)
        logits = self.model.decoder(tokens, audio, xa_mask=audio_position_mask(n_frames, audio.shape[1], audio.device))
        return logits, (audio if with_audio else None)


def _model_file(model: WhisperRope, trained_unpadded: bool) -> dict:
    """Our checkpoint dict, recording whether the encoder was trained on unpadded input."""
    previous = model.unpadded
    model.unpadded = trained_unpadded
    try:
        return checkpoint_dict(model)
    finally:
        model.unpadded = previous


# --------------------------------------------------------------------------------------------------------------------
# Distillation targets


class _TeacherTargets:
    """Greedy transcripts of the frozen teacher as training targets (``--distill-only``), cached per clip."""

    def __init__(self, teacher: WhisperRope, dataset: SpeechDataset, eot: int):
        self.teacher = teacher
        self.dataset = dataset
        self.eot = eot
        self.cache: Dict[int, List[int]] = {}

    @torch.no_grad()
    def fill(self, batch: Batch, device: torch.device) -> Batch:
        windows = batch.teacher_mel if batch.teacher_mel is not None else batch.mel
        missing = [r for r, i in enumerate(batch.indices) if i not in self.cache]
        groups: Dict[Tuple[str, Optional[str]], List[int]] = {}
        for r in missing:
            example = self.dataset.examples[batch.indices[r]]
            groups.setdefault((self.dataset.languages[batch.indices[r]], example.prompt), []).append(r)
        for (language, prompt), rows in groups.items():
            options = DecodingOptions(language=language, without_timestamps=True, fp16=False, prompt=prompt)
            for r, result in zip(rows, self.teacher.decode(windows[rows].to(device), options)):
                self.cache[batch.indices[r]] = list(result.tokens)
        token_rows, label_rows = [], []
        n_ctx = self.dataset.spec.n_text_ctx
        for index in batch.indices:
            tokenizer = self.dataset.tokenizer(index)
            prompt = self.dataset.prompts[index]
            room = n_ctx - len(prompt) - len(tokenizer.sot_sequence_including_notimestamps)  # decoder inputs <= n_ctx
            tokens, labels = target_sequence(tokenizer, self.cache[index][:room], prompt)
            token_rows.append(tokens)
            label_rows.append(labels)
        batch.tokens = pad_token_rows(token_rows, self.eot)
        batch.labels = pad_token_rows(label_rows, IGNORE_INDEX)
        return batch


# --------------------------------------------------------------------------------------------------------------------
# The run


def _input_pipeline(
    model, train, eval, config: FinetuneConfig, unpadded: bool, distill: bool, context: DistributedContext
):
    """The training and evaluation sets and the training batch sampler for one form of input (30-s windows, or
    unpadded clips in length-bucketed batches)."""
    train_set, eval_set = _load_datasets(model, train, eval, config, unpadded, distill)
    sampler = BucketBatchSampler(
        train_set.durations,
        config.batch_size,
        config.seed,
        bucket=unpadded,
        rank=context.rank,
        world_size=context.world_size,
    )
    return train_set, eval_set, sampler


def _load_datasets(model, train, eval, config: FinetuneConfig, unpadded: bool, distill: bool):
    train_set = load_examples(
        train,
        model,
        pad_30s=not unpadded,
        strict=config.strict,
        require_text=not config.distill_only,
        teacher_30s=distill,
        language=config.language,
        task=config.task,
    )
    eval_set = None
    if eval is not None:
        eval_set = load_examples(
            eval, model, pad_30s=not unpadded, strict=config.strict, language=config.language, task=config.task
        )
    return train_set, eval_set


def _check_resumable(state: dict, model: WhisperRope, source: Path) -> None:
    dims = asdict(model.dims)
    if state.get("variant") != model.variant:
        raise TrainingError(
            f"cannot resume from {str(source)!r}: it was trained as variant {state.get('variant')!r}, this run builds "
            f"{model.variant!r} (pass the same --variant)"
        )
    if state.get("dims") != dims:
        differing = sorted(k for k in dims if (state.get("dims") or {}).get(k) != dims[k])
        raise TrainingError(
            f"cannot resume from {str(source)!r}: it is a different model size ({', '.join(differing)} differ from "
            f"--model {state.get('config', {}).get('model')!r})"
        )


def finetune(
    model: Optional[WhisperRope] = None,
    train: Optional[PathLike] = None,
    eval: Optional[PathLike] = None,
    config: Optional[FinetuneConfig] = None,
    *,
    teacher: Optional[WhisperRope] = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (default: ``config.model`` loaded into ``config.variant``) on a manifest.

    Args:
        model: the model to train, in place; it stays on the training device.
        train, eval: manifests (default ``config.train`` / ``config.eval``); ``eval`` may be None.
        config: every other setting (`FinetuneConfig`).
        teacher: the distillation teacher (default: ``config.model`` loaded as the upstream ``whisper`` variant).

    Under ``torchrun`` every process calls this; rank 0 logs, evaluates and writes files.
    Raises ValueError / `WhisperRopeError` for bad settings or data, `TrainingError` when the loss becomes
    non-finite (the last checkpoint written stays intact).
    """
    config = (config or FinetuneConfig()).validate()
    train = train if train is not None else config.train
    eval = eval if eval is not None else config.eval
    if train is None:
        raise ValueError("no training data: pass --train (a manifest or a directory of audio with .txt transcripts)")
    context = from_environment(config.device)
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _run(model, train, eval, config, teacher, context)
    finally:
        torch.set_num_threads(threads)
        context.close()


def _run(model, train, eval, config: FinetuneConfig, teacher, context: DistributedContext) -> FinetuneResult:
    device = context.device
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    output = Path(config.output)
    if config.resume is None and step_checkpoints(output):
        raise TrainingError(
            f"output directory {str(output)!r} already holds checkpoints of another run: pass --resume to continue "
            "it, or choose another --output"
        )
    if context.is_main:
        output.mkdir(parents=True, exist_ok=True)
        sweep_temporary_files(output)
        if config.resume is None and (output / LOG_FILE).exists():
            (output / LOG_FILE).unlink()  # a run that never wrote a checkpoint: start its log afresh

    schedule = _transplant_schedule(config)
    if model is None:
        model = load_model(
            config.model,
            variant=TRANSPLANT_VARIANT if schedule else config.variant,
            device="cpu",
            rotary_theta=config.rotary_theta,
            gated_rotary=True if schedule else config.gated_rotary,
        )
    if schedule is not None:
        check_transplant_model(model)
    model = model.to(device)
    resumed_from = resolve_resume(config.resume or output) if config.resume is not None else None
    state = read_training_state(resumed_from / STATE_FILE) if resumed_from is not None else None
    unpadded_from = schedule.anneal_end if schedule is not None and config.transplant_unpadded else None
    if unpadded_from is not None and state is not None and int(state["step"]) >= unpadded_from:
        apply_schedule(model, schedule, int(state["step"]))  # resuming in the unpadded phase
    unpadded = not model.encoder.needs_full_window and not config.pad_to_30s
    model.unpadded = False  # training batches carry their frame counts; nothing is trimmed
    distill = config.distill or config.distill_only
    encoder_l2 = distill and config.distill_encoder_weight > 0
    if encoder_l2 and unpadded:
        logger.warning(
            "--distill-encoder-weight is ignored: the unpadded student's encoder outputs are shorter than "
            "the teacher's 30-s ones (use --pad-to-30s to compare them)"
        )
        encoder_l2 = False
    train_set, eval_set, sampler = _input_pipeline(model, train, eval, config, unpadded, distill, context)

    trainable = select_trainable(model, config.train_policy)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor, warmup_steps=config.warmup_steps, total_steps=config.steps, schedule=config.schedule
        ),
    )
    autocast_dtype, use_scaler = _precision(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    step, best_wer, best_step = 0, None, None
    if state is not None:
        _check_resumable(state, model, resumed_from)
        weights = read_checkpoint(resumed_from / MODEL_FILE)["model_state_dict"]
        model.load_state_dict(weights, strict=True)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as error:
            raise TrainingError(
                f"cannot resume from {str(resumed_from)!r}: its optimizer state does not fit this run's trainable "
                f"parameters (use the same --train-policy; {error})"
            ) from None
        restore_entry(resumed_from / STATE_FILE, "scheduler", scheduler.load_state_dict, state)
        restore_entry(resumed_from / STATE_FILE, "scaler", scaler.load_state_dict, state)
        restore_entry(resumed_from / STATE_FILE, "sampler", sampler.load_state_dict, state)
        restore_entry(resumed_from / STATE_FILE, "rng", set_rng_state, state)
        step = int(state["step"])
        best_wer, best_step = state.get("best_wer"), state.get("best_step")
        changed = sorted(
            k
            for k, v in state.get("config", {}).items()
            if k in asdict(config) and asdict(config)[k] != v and k not in BOOKKEEPING
        )
        if changed and context.is_main:
            logger.warning(
                "resuming with changed settings (%s): the run will not repeat an uninterrupted one", ", ".join(changed)
            )
        if step >= config.steps and context.is_main:
            logger.warning(
                "checkpoint %s is at step %d, which already reaches --steps %d", resumed_from, step, config.steps
            )

    if not distill:
        teacher = None
    elif teacher is None:
        teacher = load_model(config.model, variant="whisper", device="cpu")
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    targets = _TeacherTargets(teacher, train_set, train_set.tokenizer(0).eot) if config.distill_only else None

    student: nn.Module = _Student(model)
    if context.enabled:
        # Every buffer (sinusoid tables, rotary caches, the sparse alignment-head mask, which collectives cannot
        # broadcast) is computed identically on each rank: keep them out of DDP's synchronisation.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            student, [name for name, _ in student.named_buffers()]
        )
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )

    log = TrainingLog(output / LOG_FILE if context.is_main else None)
    if context.is_main:
        log.write(
            {
                "event": "start",
                "step": step,
                "variant": model.variant,
                "model": config.model,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "train_clips": len(train_set),
                "eval_clips": len(eval_set) if eval_set else 0,
                "skipped_train_rows": [str(p) for p in train_set.problems],
                "skipped_eval_rows": [str(p) for p in eval_set.problems] if eval_set else [],
                "unpadded": unpadded,
                "world_size": context.world_size,
                "resumed_from": str(resumed_from) if resumed_from else None,
            }
        )
        logger.info(
            "training %s (%s) on %d clips, %s input, %d process(es), %d trainable tensors",
            config.model,
            model.variant,
            len(train_set),
            "unpadded" if unpadded else "30-s padded",
            context.world_size,
            len(trainable),
        )

    loader = make_loader(train_set, sampler, config.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    last_saved: Optional[Path] = resumed_from
    last_eval_step, last_save_step = None, step if resumed_from else None
    final_loss: Optional[float] = None

    def run_eval() -> None:
        nonlocal last_eval_step
        last_eval_step = step
        if context.is_main and eval_set is not None:
            evaluate_and_keep_best()
        context.barrier()

    def evaluate_and_keep_best() -> None:
        nonlocal best_wer, best_step
        metrics = validation_metrics(model, eval_set, config.batch_size, device)
        log.write({"event": "eval", "step": step, **metrics})
        logger.info(
            "step %d: validation loss %.4f, WER %.2f%%, CER %.2f%% (%d clips, %.1f s)",
            step,
            metrics["loss"],
            100 * metrics["wer"],
            100 * metrics["cer"],
            metrics["n_clips"],
            metrics["seconds"],
        )
        if best_wer is None or metrics["wer"] < best_wer:
            best_wer, best_step = metrics["wer"], step
            best_dir = output / "best"
            best_dir.mkdir(exist_ok=True)
            atomic_torch_save(_model_file(model, unpadded), best_dir / MODEL_FILE)
            atomic_write_text(best_dir / "metrics.json", json.dumps(jsonable({"step": step, **metrics}), indent=2))

    def save() -> None:
        nonlocal last_saved, last_save_step
        last_save_step = step
        if context.is_main:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": rng_state(),
                "config": asdict(config),
                "variant": model.variant,
                "dims": asdict(model.dims),
                "trained_unpadded": unpadded,
                "world_size": context.world_size,
                "best_wer": best_wer,
                "best_step": best_step,
            }
            last_saved = save_step_checkpoint(output, step, _model_file(model, unpadded), state, config.keep_last)
            log.write({"event": "checkpoint", "step": step, "path": str(last_saved)})
        context.barrier()

    position = sampler.position
    window = _new_window()
    progress = _progress_bar(config, context, step)
    if config.eval_at_start and resumed_from is None:
        run_eval()

    model.train()
    with gradient_checkpointing(model, config.gradient_checkpointing), logging_redirect_tqdm():
        while step < config.steps:
            if schedule is not None:
                apply_schedule(model, schedule, step)
            if unpadded_from is not None and not unpadded and step >= unpadded_from:
                # The tables are gone: from here on the encoder sees each clip's own frames.
                unpadded, encoder_l2 = True, False
                del batches, loader  # shuts down the padded pipeline's workers
                train_set, eval_set, sampler = _input_pipeline(model, train, eval, config, True, distill, context)
                sampler.position = position
                if config.distill_only:
                    targets = _TeacherTargets(teacher, train_set, train_set.tokenizer(0).eot)
                loader = make_loader(train_set, sampler, config.num_workers, pin_memory=device.type == "cuda")
                batches = iter(loader)
                if context.is_main:
                    logger.info("step %d: the absolute tables are gone; training continues on unpadded input", step)
                    log.write({"event": "input", "step": step, "unpadded": True})
            for micro in range(config.grad_accum):
                batch: Batch = next(batches)
                position += 1
                for row in batch.replaced_rows:
                    logger.warning(
                        "%s, row %d could not be decoded and was replaced in this batch", train_set.source, row
                    )
                batch = _prepare_batch(batch, position, targets, config, distill, device)
                # DDP synchronises gradients on the last micro-batch of a step only.
                sync = micro == config.grad_accum - 1 or not context.enabled
                with contextlib.nullcontext() if sync else student.no_sync():
                    loss, stats, n_tokens = _micro_batch_loss(
                        student, teacher, batch, config, context, autocast_dtype, encoder_l2
                    )
                    if not math.isfinite(stats["loss"]):
                        _stop_non_finite(log, context, step, stats["loss"], last_saved)
                    scaler.scale(loss).backward()
                window["loss"] += stats["ce"]
                window["kl"] += stats["kl"]
                window["tokens"] += n_tokens
                window["seconds"] += stats["seconds"]

            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, config.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            with warnings.catch_warnings():
                # With fp16 the scaler skips steps whose gradients overflowed (the first ones, while it calibrates);
                # the schedule still advances by one step, which is what torch warns about here.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["steps"] += 1
            sampler.position = position

            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window["started"]
                final_loss = window["loss"] / max(window["tokens"], 1.0)
                record = {
                    "event": "train",
                    "step": step,
                    "loss": final_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "audio_seconds_per_second": window["seconds"] / max(elapsed, 1e-9),
                    "seconds_per_step": elapsed / window["steps"],
                }
                if distill:
                    record["kl"] = window["kl"] / max(window["tokens"], 1.0)
                if context.is_main:
                    log.write(record)
                    progress.set_postfix(
                        loss=f"{final_loss:.4f}",
                        lr=f"{record['lr']:.2e}",
                        audio_s_per_s=f"{record['audio_seconds_per_second']:.1f}",
                    )
                window = _new_window()
            progress.update(1)

            if config.eval_every and step % config.eval_every == 0:
                run_eval()
            if config.save_every and step % config.save_every == 0:
                save()

        if eval_set is not None and last_eval_step != step:
            run_eval()
        if last_save_step != step:
            save()
    progress.close()

    if schedule is not None:
        apply_schedule(model, schedule, step)
        model = _finish_transplant(model, schedule, log, context)
    model_path = None
    if context.is_main:
        model_path = atomic_torch_save(_model_file(model, unpadded), output / MODEL_FILE)
        log.write(
            {"event": "end", "step": step, "model": str(model_path), "best_wer": best_wer, "best_step": best_step}
        )
        plot_curves(output / LOG_FILE, output / CURVES_FILE)
    context.barrier()
    model.unpadded = unpadded
    return FinetuneResult(
        model=model,
        steps=step,
        output=output,
        model_path=model_path,
        checkpoint=last_saved,
        final_loss=final_loss,
        best_wer=best_wer,
        best_step=best_step,
        history=log.records,
        skipped_rows={
            "train": [str(p) for p in train_set.problems],
            "eval": [str(p) for p in eval_set.problems] if eval_set else [],
        },
    )


def _transplant_schedule(config: FinetuneConfig) -> Optional[TransplantSchedule]:
    if not config.transplant:
        return None
    anneal_steps = config.transplant_anneal_steps
    return TransplantSchedule(
        anneal_start=config.transplant_anneal_start,
        anneal_steps=max(1, config.steps // 2) if anneal_steps is None else anneal_steps,
        shape=config.transplant_shape,
        sides=config.transplant_sides,
        gate_start=config.transplant_gate_start,
        gate_steps=config.transplant_gate_steps,
    )


def _finish_transplant(
    model: WhisperRope, schedule: TransplantSchedule, log: TrainingLog, context: DistributedContext
) -> WhisperRope:
    """Turn a finished transplant into the plain rotary model; otherwise keep (and say why) the hybrid."""
    if not schedule.ends_pure_rotary():
        return model
    try:
        plain, report = finalize_transplant(model)
    except WhisperRopeError as error:
        if context.is_main:
            logger.warning("keeping the hybrid model: %s", error)
            log.write({"event": "transplant", "finished": False, "reason": str(error)})
        return model
    if context.is_main:
        logger.info("transplant finished: saved as %s (%s)", plain.variant, report.summary())
        log.write({"event": "transplant", "finished": True, "variant": plain.variant, "dropped": report.dropped})
    return plain


def _new_window() -> Dict[str, float]:
    """Sums over the steps since the last log record."""
    return {"loss": 0.0, "kl": 0.0, "tokens": 0.0, "seconds": 0.0, "steps": 0, "started": time.perf_counter()}


def _prepare_batch(
    batch: Batch,
    position: int,
    targets: Optional["_TeacherTargets"],
    config: FinetuneConfig,
    distill: bool,
    device: torch.device,
) -> Batch:
    """Teacher transcripts (--distill-only), SpecAugment (seeded by run position and clip), then onto the device."""
    if targets is not None:
        batch = targets.fill(batch, device)
    if config.spec_augment:
        if distill and batch.teacher_mel is None:
            batch.teacher_mel = batch.mel.clone()  # the teacher hears the clean audio
        for row, index in enumerate(batch.indices):
            # Masks depend on (seed, position, clip) alone: the same on any number of ranks, and after a resume.
            generator = torch.Generator().manual_seed(hash((config.seed, position, index)) & 0x7FFFFFFF)
            spec_augment_(batch.mel[row], batch.frames[row], generator)
    return batch.to(device)


def _micro_batch_loss(
    student: nn.Module,
    teacher: Optional[WhisperRope],
    batch: Batch,
    config: FinetuneConfig,
    context: DistributedContext,
    autocast_dtype: Optional[torch.dtype],
    encoder_l2: bool,
) -> Tuple[Tensor, Dict[str, float], float]:
    """Forward one micro-batch; returns (loss to backpropagate, statistics summed over ranks, global target tokens).

    The loss is normalised by the *global* number of target tokens and multiplied by the world size, because DDP
    averages gradients over ranks: the update is then that of the whole global batch on one process.
    """
    device = batch.mel.device
    target_mask = batch.labels != IGNORE_INDEX
    n_tokens = float(context.all_reduce_sum(target_mask.sum().to(torch.float64).reshape(1))[0])
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, audio = student(batch.mel, batch.tokens, batch.n_frames, with_audio=encoder_l2)
    ce_sum = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch.labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=config.label_smoothing,
    )
    kl_sum = torch.zeros((), device=device)
    encoder_term = torch.zeros((), device=device)
    if teacher is not None:
        kl_sum, encoder_term = _distillation_terms(teacher, batch, logits, audio, target_mask, config, context)
    scale = context.world_size / config.grad_accum
    loss = (ce_sum + config.distill_weight * kl_sum) * (scale / max(n_tokens, 1.0)) + encoder_term * scale
    stats = torch.stack([ce_sum.detach(), kl_sum.detach(), loss.detach() / scale]).double()
    stats = torch.cat([stats, torch.tensor([sum(batch.seconds)], dtype=torch.float64, device=device)])
    ce, kl, total, seconds = context.all_reduce_sum(stats).tolist()
    return loss, {"ce": ce, "kl": kl, "loss": total, "seconds": seconds}, n_tokens


def _distillation_terms(
    teacher,
    batch: Batch,
    logits: Tensor,
    audio: Optional[Tensor],
    target_mask: Tensor,
    config: FinetuneConfig,
    context: DistributedContext,
) -> Tuple[Tensor, Tensor]:
    """(KL(teacher || student) summed over target tokens, encoder L2 term normalised over the global batch).

    ``audio`` is the student's encoder output, given only when it has the teacher's length (30-s input).
    """
    windows = batch.teacher_mel if batch.teacher_mel is not None else batch.mel
    with torch.no_grad():
        teacher_audio = teacher.encoder(windows)
        teacher_logits = teacher.decoder(batch.tokens, teacher_audio)
    t = config.distill_temperature
    student_log_p = F.log_softmax(logits.float()[target_mask] / t, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.float()[target_mask] / t, dim=-1)
    kl_sum = F.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="sum") * (t * t)
    encoder_term = torch.zeros((), device=logits.device)
    if audio is not None:
        count = torch.tensor([float(audio.numel())], dtype=torch.float64, device=logits.device)
        total = float(context.all_reduce_sum(count)[0])
        encoder_term = config.distill_encoder_weight * ((audio.float() - teacher_audio.float()) ** 2).sum() / total
    return kl_sum, encoder_term


def _stop_non_finite(
    log: TrainingLog, context: DistributedContext, step: int, loss: float, last_saved: Optional[Path]
) -> None:
    kept = f"the last good checkpoint is {str(last_saved)!r}" if last_saved else "no checkpoint had been written yet"
    message = (
        f"training stopped: the loss became {loss if not math.isfinite(loss) else 'non-finite'} at step {step + 1} "
        f"({kept}); lower --lr, lengthen --warmup-steps or keep --grad-clip on"
    )
    if context.is_main:
        log.write({"event": "error", "step": step + 1, "message": message})
    raise TrainingError(message)


def _progress_bar(config: FinetuneConfig, context: DistributedContext, step: int) -> tqdm:
    return tqdm(
        total=config.steps,
        initial=step,
        unit="step",
        disable=not (config.progress and context.is_main),
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per `FinetuneConfig` field: ``--batch-size`` (also ``--batch_size``); booleans as
    ``--flag``/``--no-flag``."""
    return add_dataclass_arguments(parser, FinetuneConfig)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The `FinetuneConfig` of parsed ``whisper-rope finetune`` arguments (validated)."""
    return dataclass_from_args(FinetuneConfig, args).validate()


def run_finetune_cli(args: argparse.Namespace) -> int:
    """Run ``whisper-rope finetune`` from parsed arguments; returns the exit status."""
    config = config_from_args(args)
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = finetune(config=config)
    if rank == 0:
        summary = f"trained {result.steps} steps; final model {result.model_path}"
        if result.best_wer is not None:
            summary += f"; best WER {100 * result.best_wer:.2f}% at step {result.best_step} ({result.output / 'best'})"
        print(summary)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m whisper_rope.training.loop ...`` (or ``python -m whisper_rope.train``): the finetune command on
    its own (also under torchrun)."""
    description = "Fine-tune a Whisper checkpoint into a positional variant."
    return standalone_main("whisper-rope finetune", description, add_finetune_arguments, run_finetune_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
