"""The fine-tuning loop: ``finetune(model, train, eval, config)``.

The run is a `RunState` and small steps, read top to bottom in `_run`: set up (model, teacher, pipeline,
optimizer), resume, then per step: the schedules (transplant fade and gates, staged training, the switch to
unpadded input), one optimizer step over ``grad_accum`` micro-batches, logging, evaluation and checkpoints; then the
end (a finished transplant becomes its plain variant). Under ``torchrun`` the same code trains with
DistributedDataParallel.

Output directory::

    model.pt                 the final model, our checkpoint format (``whisper_rope.load_model`` reads it)
    step-0000500/            with --save-every N: every N steps and at the end; the last --keep-last are kept
        model.pt             the model at that step
        training_state.pt    optimizer, LR scheduler, grad scaler, step, RNG states, sampler position, config, and
                             the float32 weights that model.pt's dtype rounds
    best/model.pt            the model with the lowest evaluation WER so far (best/metrics.json says which)
    train_log.jsonl          every logged metric, one JSON object per line
    training_curves.png      loss and WER curves, drawn at the end

Model files hold their weights in ``--save-dtype`` (float16 by default, like upstream's checkpoints). Files that
hold the same weights (the final model, the best model found at the last step, the last step's model) are hard links
to one file, so a run's folder holds one copy of the final model; the disk a run needs is logged at its start.
Every file is written atomically (a temporary file, fsynced, renamed), and a step directory only appears once both
of its files are complete, so a crash at any moment leaves the previous checkpoint loadable. Every ``.pt`` file
holds only tensors and plain data: ``torch.load(path, weights_only=True)`` reads it.

Batch sizes: ``batch_size`` is the *global* number of clips per forward pass (split evenly over the processes);
one optimizer step uses ``batch_size * grad_accum`` clips. Every loss term is normalised over the global batch
(`objective`), so a run gives the same updates on one process or several.
"""

import contextlib
import json
import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import window_seconds
from ..errors import PathLike, TrainingError, WhisperRopeError
from ..evaluation.evaluate import validation_metrics
from ..fs.atomic import atomic_torch_save, atomic_write_text
from ..fs.outputs import DirectoryClaim, claim_directory, refuse_overlap, temporary_of
from ..model import WhisperRope
from ..variants import parse_variant
from ..weights.format import read_checkpoint
from ..weights.loading import checkpoint_dict, load_model
from .config import BOOKKEEPING, FIXED_ON_RESUME, FinetuneConfig
from .distributed import DistributedContext, from_environment
from .footprint import disk_estimate
from .holdout import (
    EVERY_LENGTH_AUDIO,
    EVERY_LENGTH_MANIFEST,
    HOLDOUT_MANIFEST,
    ROW_FIELDS,
    TRAIN_MANIFEST,
    holdout_rows,
    planned_holdout,
    read_holdout,
    split_holdout,
    teacher_references,
)
from .log import TrainingLog, jsonable, plot_curves
from .losses import StateWeights
from .objective import Objective, StudentForward, micro_batch_loss
from .optim import (
    apply_peak_settings,
    build_optimizer,
    gradient_checkpointing,
    lr_scheduler,
    peak_settings,
    precision,
    select_trainable,
)
from .pipeline import Pipeline, build_pipeline, prepare_batch, teacher_cache
from .state import (
    MODEL_FILE,
    SAVE_DTYPES,
    STAGING_DIR,
    STATE_FILE,
    STEP_DIR,
    cast_checkpoint,
    link_or_copy,
    read_training_state,
    resolve_resume,
    restore_entry,
    rng_state,
    rounded_weights,
    save_step_checkpoint,
    set_rng_state,
    step_checkpoints,
    sweep_temporary_files,
)
from .state import REPORT_JSON_FILE as JSON_FILE
from .state import REPORT_TABLE_FILE as TABLE_FILE
from .teacher_cache import TeacherCache
from .transplant import (
    TransplantSchedule,
    apply_schedule,
    check_transplant_model,
    finalize_transplant,
    finishes,
    transplant_start_variant,
)

logger = logging.getLogger("whisper_rope")

LOG_FILE = "train_log.jsonl"
CURVES_FILE = "training_curves.png"
#: Every name a fine-tune writes into its --output, besides step-N/ and their staging directories.
RUN_FILES = (
    MODEL_FILE,
    LOG_FILE,
    CURVES_FILE,
    "best",
    TRAIN_MANIFEST,
    HOLDOUT_MANIFEST,
    EVERY_LENGTH_MANIFEST,
    EVERY_LENGTH_AUDIO,
    JSON_FILE,
    TABLE_FILE,
)


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
    already_finished: bool = False  # the output held this run, finished: nothing was trained


@dataclass
class RunState:
    """What the steps of one run share: what `_setup` builds (the fields without a default; ``schedule`` is None
    without --transplant, ``cache`` and ``teacher_embedding`` without a teacher term), then the run's progress.
    ``step`` counts finished optimizer steps, ``position`` consumed batches."""

    config: FinetuneConfig
    context: DistributedContext
    output: Path
    log: TrainingLog
    schedule: Optional[TransplantSchedule]
    model: WhisperRope
    objective: Objective
    cache: Optional[TeacherCache]
    teacher_embedding: Optional[Tensor]
    train: Any  # the training manifest (after --eval-holdout's split)
    eval: Any
    pipeline: Pipeline
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast_dtype: Optional[torch.dtype]
    resumed_from: Optional[Path]
    student: Optional[nn.Module] = None  # set by `_wrap_student` before the first step
    staged: Optional[bool] = None  # whether --stage-policy alone trains (None before the first step)
    step: int = 0
    position: int = 0
    best_wer: Optional[float] = None
    best_step: Optional[int] = None
    last_saved: Optional[Path] = None
    last_eval_step: Optional[int] = None
    last_save_step: Optional[int] = None
    last_model_file: Optional[Tuple[int, Path]] = None  # (step, path) of the last model file this run wrote
    final_loss: Optional[float] = None
    window: Dict[str, float] = field(default_factory=dict)
    settings_history: List[Dict[str, Any]] = field(default_factory=list)  # [{"step", "changed": {key: [old, new]}}]
    holdout: Optional[List[Dict[str, Any]]] = None  # the clips held out of --train (`holdout.holdout_rows`)

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def unpadded(self) -> bool:
        return self.pipeline.unpadded

    @property
    def unpadded_from(self) -> Optional[int]:
        """The step at which a transplant's padded start switches to unpadded input (None: no switch)."""
        if self.schedule is None or not self.config.transplant_unpadded:
            return None
        return self.schedule.anneal_end


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
        train, eval: manifests or folders of audio (default ``config.train`` / ``config.eval``); ``eval`` may be None.
        config: every other setting (`FinetuneConfig`).
        teacher: the distillation teacher (default: ``config.teacher``, else ``config.model``, loaded as the
            upstream ``whisper`` variant).

    Under ``torchrun`` every process calls this; rank 0 logs, evaluates and writes files.
    Raises ValueError / `WhisperRopeError` for bad settings or data, `TrainingError` when the loss becomes
    non-finite (the last checkpoint written stays intact).
    """
    config = (config or FinetuneConfig()).validate()
    train = train if train is not None else config.train
    eval = eval if eval is not None else config.eval
    if train is None:
        raise ValueError("no training data: pass --train (a manifest or a directory of audio with .txt transcripts)")
    # A folder too small to train on (or to hold clips out of) is refused before anything loads.
    holdout = planned_holdout(train, config.eval_holdout if eval is None else 0, config.batch_size)
    config = replace(config, eval_holdout=holdout if eval is None else config.eval_holdout or 0)
    context = from_environment(config.device)
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        with _prepare_output(config, context, recognise_finished=model is None) as claim:
            if model is None and config.resume is None and finished_differences(claim.path, config) == {}:
                return _finished_result(config, claim.path, context)
            return _run(model, train, eval, config, teacher, context, claim.path)
    finally:
        torch.set_num_threads(threads)
        context.close()


def _run(model, train, eval, config: FinetuneConfig, teacher, context: DistributedContext, output: Path):
    run = _setup(model, train, eval, config, teacher, context, output)
    if config.eval_at_start and run.resumed_from is None:
        _evaluate(run)
    progress = tqdm(
        total=config.steps,
        initial=run.step,
        unit="step",
        dynamic_ncols=True,
        disable=not (config.progress and context.is_main),
    )
    run.model.train()
    with gradient_checkpointing(run.model, config.gradient_checkpointing), logging_redirect_tqdm():
        while run.step < config.steps:
            _before_step(run)
            grad_norm, lr = _optimizer_step(run)
            _after_step(run, grad_norm, lr, progress)
        if run.pipeline.eval_set is not None and run.last_eval_step != run.step:
            _evaluate(run)
        if config.save_every and run.last_save_step != run.step:
            _save(run)
    progress.close()
    return _finish(run)


# --------------------------------------------------------------------------------------------------------------------
# Setting up


def _setup(model, train, eval, config: FinetuneConfig, teacher, context: DistributedContext, output: Path) -> RunState:
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    log = TrainingLog(output / LOG_FILE if context.is_main else None)
    for message in config.self_defeating():
        logger.warning("%s", message)
    schedule = _transplant_schedule(config)
    model = _student_model(model, config, schedule).to(context.device)
    resumed_from = resolve_resume(config.resume or output) if config.resume is not None else None
    state = read_training_state(resumed_from / STATE_FILE) if resumed_from is not None else None
    if schedule is not None:
        apply_schedule(model, schedule, int(state["step"]) if state else 0)
    unpadded = _starts_unpadded(model, config, schedule, state)
    model.configure(unpadded=unpadded, unpadded_margin=config.unpadded_margin, eot_penalty=config.eot_penalty)
    objective = _objective(config)
    cache, teacher_embedding = _teacher(config, teacher, objective, eval, context.device)
    if cache is not None:
        _check_teacher_fits(cache.teacher, model, config)
    kept = _kept_holdout(state, output) if state is not None and config.eval_holdout and eval is None else None
    if kept is not None:
        config = replace(config, eval_holdout=len(kept))  # the resumed run's hold-out, whatever the folder holds now
    train, eval, held_out = _holdout_split(config, train, eval, cache, output, context, kept)
    cache = cache if _learns_from_teacher(config, objective) else None
    pipeline = build_pipeline(model, train, eval, config, unpadded, cache, context, config.progress)
    model.adapted_seconds = window_seconds(pipeline.train_set.examples)  # saved with every checkpoint
    optimizer, scheduler, scaler, autocast_dtype = _optimisation(model, config, context.device)
    run = RunState(
        config=config,
        context=context,
        output=output,
        log=log,
        schedule=schedule,
        model=model,
        objective=objective,
        cache=cache,
        teacher_embedding=teacher_embedding,
        train=train,
        eval=eval,
        pipeline=pipeline,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        resumed_from=resumed_from,
    )
    run.holdout = held_out
    if state is not None:
        _resume(run, state)
    run.position, run.last_saved = run.pipeline.sampler.position, run.resumed_from
    run.last_save_step = run.step if run.resumed_from else None
    run.window = _new_window()
    _log_start(run)
    return run


def _optimisation(
    model: WhisperRope, config: FinetuneConfig, device: torch.device
) -> Tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler, Optional[torch.dtype]]:
    """Trainable parameters, then (AdamW with a group per learning rate and decay, its schedule, the gradient
    scaler, the autocast dtype)."""
    select_trainable(model, config.train_policy)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.lr_positional)
    scheduler = lr_scheduler(optimizer, config.effective_warmup, config.steps, config.schedule)
    autocast_dtype, use_scaler = precision(config.precision, device)
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=use_scaler), autocast_dtype


def _prepare_output(config: FinetuneConfig, context: DistributedContext, recognise_finished: bool) -> DirectoryClaim:
    """The output directory, claimed and locked for this run (on rank 0; the other ranks get an unlocked claim).

    Refused before anything is written: an output that is or holds --model, --train or --eval; a directory of files
    this command did not write, or of another command's; one another run is using; without --resume, one holding a
    finished run of other settings or step checkpoints. A finished run of the same settings is kept as it is when
    ``recognise_finished`` (the caller returns it). Only this run's own leftovers (a staging directory, its atomic
    writes' temporary files) are swept, and a fresh start in a directory of an earlier run that never saved starts
    its log afresh.
    """
    inputs = {"--model": config.model, "--teacher": config.teacher, "--train": config.train, "--eval": config.eval}
    refuse_overlap(config.output, inputs, "--output")
    output = Path(config.output).expanduser()
    if not context.is_main:
        return DirectoryClaim(output, "finetune", adopted=True)
    claim = claim_directory(output, "finetune", "--output", _run_entry, adopt_unmarked=config.resume is not None)
    try:
        finished = finished_differences(output, config) if config.resume is None else None
        if finished:
            raise TrainingError(
                f"output directory {str(config.output)!r} holds a finished run of other settings "
                f"({_differences_text(finished)}): choose another --output"
                + (
                    ", or pass --resume to continue its last step checkpoint"
                    if step_checkpoints(output)
                    else " (it kept no step checkpoint to --resume from: --save-every N keeps one)"
                )
            )
        recognised = finished == {} and recognise_finished
        if config.resume is None and not recognised and step_checkpoints(output):
            raise TrainingError(
                f"output directory {str(config.output)!r} already holds checkpoints of an earlier run: pass "
                "--resume to continue it, or choose another --output"
            )
        sweep_temporary_files(output, RUN_FILES)
        if config.resume is None and not recognised and (output / LOG_FILE).exists():
            (output / LOG_FILE).unlink()  # this command's log of a run that never finished: start afresh
    except BaseException:
        claim.release()
        raise
    return claim


#: Settings that change neither what a run trains nor what it writes: a finished run that differs from a new
#: command only in these is the same run.
RUN_INDEPENDENT = {"output", "resume", "progress", "num_workers", "threads", "device", "recipe"}


def finished_run(output: Path) -> Optional[Dict[str, Any]]:
    """The log record of the end of the finished run in ``output`` (with its settings under ``config``), or None
    when ``output`` holds no finished run (no final model, or no log record of its end)."""
    if not (output / MODEL_FILE).is_file():
        return None
    end = None
    try:
        with open(output / LOG_FILE, encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line) if line.strip() else {}
                if isinstance(record, dict) and record.get("event") == "end":
                    end = record
    except (OSError, ValueError):
        return None
    return end if end is not None and isinstance(end.get("config"), dict) else None


def finished_differences(output: Path, config: FinetuneConfig) -> Optional[Dict[str, List[Any]]]:
    """{setting: [the finished run's, this config's]} of the settings that differ from the finished run in
    ``output`` ({} for the same run); None when ``output`` holds no finished run."""
    end = finished_run(output)
    if end is None:
        return None
    stored, current = end["config"], jsonable(asdict(config))
    return {
        key: [stored.get(key), current[key]]
        for key in sorted(current)
        if key not in RUN_INDEPENDENT and stored.get(key) != current[key]
    }


def _differences_text(differences: Dict[str, List[Any]]) -> str:
    return ", ".join(f"--{key.replace('_', '-')} {old!r} there, {new!r} now" for key, (old, new) in differences.items())


def _finished_result(config: FinetuneConfig, output: Path, context: DistributedContext) -> FinetuneResult:
    """The result of the finished run of the same settings in ``output``, read back from its files."""
    records = [json.loads(line) for line in (output / LOG_FILE).read_text(encoding="utf-8").splitlines() if line]
    end = [r for r in records if r.get("event") == "end"][-1]
    losses = [r["loss"] for r in records if r.get("event") == "train" and "loss" in r]
    if context.is_main:
        logger.info("%s already holds this run, finished at step %d: nothing to do", output, end["step"])
    step_dirs = step_checkpoints(output)
    start = next((r for r in records if r.get("event") == "start"), {})
    skipped = {"train": start.get("skipped_train_rows", []), "eval": start.get("skipped_eval_rows", [])}
    return FinetuneResult(
        load_model(output / MODEL_FILE, device=context.device),
        int(end["step"]),
        output,
        output / MODEL_FILE,
        step_dirs[-1][1] if step_dirs else None,
        losses[-1] if losses else None,
        end.get("best_wer"),
        end.get("best_step"),
        records,
        skipped,
        already_finished=True,
    )


def _run_entry(name: str) -> bool:
    """Whether ``name`` is something a fine-tune writes into its --output (see the module docstring)."""
    return name in RUN_FILES or bool(STEP_DIR.match(name) or STAGING_DIR.match(name)) or temporary_of(name, RUN_FILES)


def _student_model(model: Optional[WhisperRope], config: FinetuneConfig, schedule) -> WhisperRope:
    """The model to train: the one given, else --model loaded into --variant (a transplant's gated hybrid)."""
    if model is None:
        model = load_model(
            config.model,
            variant=transplant_start_variant(config.variant) if schedule else config.variant,
            device="cpu",
            rotary_theta=config.rotary_theta,
            gated_rotary=True if schedule else config.gated_rotary,
            progress=config.progress,
        )
    if schedule is not None:
        check_transplant_model(model)
    return model


def _starts_unpadded(model: WhisperRope, config: FinetuneConfig, schedule, state: Optional[dict]) -> bool:
    """Whether the run (or its resumed part) trains on each clip's own frames."""
    if config.transplant_unpadded:
        return state is not None and int(state["step"]) >= schedule.anneal_end
    if config.unpadded is not None:
        return config.unpadded
    return not model.encoder.has_table and not config.pad_to_30s


def _objective(config: FinetuneConfig) -> Objective:
    states = StateWeights(
        decoder_layers=config.distill_decoder_layers,
        encoder_output=config.distill_encoder_weight,
        encoder_layers=config.distill_encoder_layers,
        attention=config.distill_attention,
    )
    kl = config.distill_weight if (config.distill or config.distill_only) else 0.0
    return Objective(
        ce=config.ce_weight,
        kl=kl,
        temperature=config.distill_temperature,
        label_smoothing=config.label_smoothing,
        states=states,
    )


def _learns_from_teacher(config: FinetuneConfig, objective: Objective) -> bool:
    """Whether training batches need the teacher's targets (its transcripts, distribution or states)."""
    return objective.uses_teacher or config.distill_only


def _teacher(config: FinetuneConfig, teacher: Optional[WhisperRope], objective: Objective, eval, device):
    """(the teacher's target cache, its token embedding for the KL term), or (None, None) when no teacher is needed
    (neither for training nor for the references of held-out clips)."""
    holdout = config.eval_holdout > 0 and eval is None
    if not (_learns_from_teacher(config, objective) or holdout):
        return None, None
    if teacher is None:
        teacher = load_model(config.teacher or config.model, variant="whisper", device="cpu", progress=config.progress)
    teacher = teacher.to(device).eval().requires_grad_(False)
    cache = teacher_cache(config, teacher, objective.cached_kinds)
    embedding = teacher.decoder.token_embedding.weight.detach() if objective.kl > 0 else None
    return cache, embedding


def _check_teacher_fits(teacher: WhisperRope, student: WhisperRope, config: FinetuneConfig) -> None:
    """Raise `TrainingError` when the teacher's sizes differ from the student's (its states, transcripts and
    distribution are matched position by position and token by token)."""
    differ = {
        name: (value, getattr(student.dims, name))
        for name, value in vars(teacher.dims).items()
        if name != "n_audio_ctx" and value != getattr(student.dims, name)
    }
    if differ:
        shown = ", ".join(f"{name} {theirs} against {ours}" for name, (theirs, ours) in sorted(differ.items()))
        raise TrainingError(
            f"--teacher {str(config.teacher or config.model)!r} is not the student's size ({shown}): distillation "
            "needs a teacher of the same dimensions and vocabulary"
        )


def _holdout_split(
    config: FinetuneConfig, train, eval, cache: Optional[TeacherCache], output: Path, context, kept: Optional[list]
):
    """With --eval-holdout and no --eval: (the training clips minus the held-out ones, the held-out clips with the
    teacher's transcripts as references, the held-out clips as rows), the manifests written into the run's
    directory; else (train, eval, None). ``kept``: the hold-out of the run a resume continues (`_kept_holdout`),
    held out again instead of a new draw from the folder."""
    if not config.eval_holdout or eval is not None:
        return train, eval, None
    if context.is_main:
        _, held_out = split_holdout(train, config.eval_holdout, config.seed, output, kept)
        teacher_references(held_out, cache.teacher, cache.root, output, config.language, config.task)
        kept = holdout_rows(held_out)
    context.barrier()
    return output / TRAIN_MANIFEST, output / HOLDOUT_MANIFEST, kept


def _kept_holdout(state: dict, output: Path) -> Optional[List[Dict[str, Any]]]:
    """The held-out clips a checkpoint's run used: stored in its state, else its holdout manifest; None if neither
    is there and readable (then the clips are drawn again)."""
    stored = state.get("holdout")
    if isinstance(stored, list) and stored and all(_holdout_row(row) for row in stored):
        return stored
    try:
        return holdout_rows(read_holdout(output / HOLDOUT_MANIFEST)) or None
    except (OSError, ValueError, TypeError, AttributeError):  # missing, or not our JSON lines
        return None


def _holdout_row(row: Any) -> bool:
    """Whether ``row`` is a held-out clip as `holdout.holdout_rows` stores it."""
    if not (isinstance(row, dict) and isinstance(row.get("audio"), str)):
        return False
    numbers = all(isinstance(row.get(key), (int, float, type(None))) for key in ("start", "end"))
    texts = all(isinstance(row.get(key), (str, type(None))) for key in ("language", "prompt"))
    return numbers and texts and set(row) <= set(ROW_FIELDS)


def _resume(run: RunState, state: dict) -> None:
    """Continue exactly where the checkpoint stopped: weights, optimizer, schedules, sampler and RNG states; changed
    optimizer settings (--lr, --lr-positional, --weight-decay, the schedule) apply from here and are recorded; a
    changed --seed or --batch-size, which a resumed run cannot apply, is refused."""
    source, config = run.resumed_from, run.config
    _check_resumable(state, run.model, source)
    changed = _changed_settings(run, state)
    weights = read_checkpoint(source / MODEL_FILE)["model_state_dict"]
    exact = state.get("exact_weights", {})  # absent from float32 checkpoints of earlier versions
    if not (isinstance(exact, dict) and set(exact) <= set(weights) and all(map(torch.is_tensor, exact.values()))):
        raise TrainingError(
            f"training state {str(source / STATE_FILE)!r} has an unusable 'exact_weights' entry (expected float32 "
            f"weights named as in {MODEL_FILE})"
        )
    run.model.load_state_dict({**weights, **exact}, strict=True)
    settings = peak_settings(run.optimizer)  # this run's, before the checkpoint's replace them
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as error:
        raise TrainingError(
            f"cannot resume from {str(source)!r}: its optimizer state does not fit this run's parameters (use the "
            f"same --train-policy and --lr-positional; {error})"
        ) from None
    for key, load in (
        ("scheduler", run.scheduler.load_state_dict),
        ("scaler", run.scaler.load_state_dict),
        ("sampler", run.pipeline.sampler.load_state_dict),
        ("rng", set_rng_state),
    ):
        restore_entry(source / STATE_FILE, key, load, state)
    apply_peak_settings(run.optimizer, run.scheduler, settings)
    run.step = int(state["step"])
    run.best_wer, run.best_step = state.get("best_wer"), state.get("best_step")
    _record_changed_settings(run, state, changed)
    if run.step >= config.steps and run.context.is_main:
        logger.warning("checkpoint %s is at step %d, which already reaches --steps %d", source, run.step, config.steps)


def _changed_settings(run: RunState, state: dict) -> Dict[str, List[Any]]:
    """{setting: [checkpoint's, this run's]} of the trajectory settings that differ; refuses a change a resumed run
    cannot apply (`FIXED_ON_RESUME`) before anything is restored."""
    stored, current = state.get("config", {}), asdict(run.config)
    changed = {
        key: [stored[key], current[key]]
        for key in sorted(stored)
        if key in current and key not in BOOKKEEPING and current[key] != stored[key]
    }
    for key in changed:
        if key in FIXED_ON_RESUME:
            old, new = changed[key]
            raise TrainingError(
                f"cannot resume from {str(run.resumed_from)!r} with --{key.replace('_', '-')} {new!r} (the "
                f"checkpoint used {old!r}): {FIXED_ON_RESUME[key]}; resume with the same value or start a new run "
                "in another --output"
            )
    return changed


def _record_changed_settings(run: RunState, state: dict, changed: Dict[str, List[Any]]) -> None:
    """Keep the checkpoint's settings history and add this resume's changes to it ({setting: [old, new]})."""
    history = state.get("settings_history")
    run.settings_history = list(history) if isinstance(history, list) else []
    if not changed:
        return
    run.settings_history.append({"step": run.step, "changed": changed})
    if run.context.is_main:
        logger.warning(
            "resuming at step %d with changed settings (%s): applied from step %d on, and recorded in the "
            "checkpoints' settings_history",
            run.step,
            ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()),
            run.step,
        )


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


def _wrap_student(run: RunState) -> None:
    """The student's forward as one module; DDP-wrapped under torchrun, for the parameters that train now."""
    student: nn.Module = StudentForward(run.model, run.objective.states.active, packed=run.config.packed_attention)
    if run.context.enabled:
        # Every buffer (sinusoid tables, rotary caches, the sparse alignment-head mask, which collectives cannot
        # broadcast) is computed identically on each rank: keep them out of DDP's synchronisation.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            student, [name for name, _ in student.named_buffers()]
        )
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    run.student = student


def _log_start(run: RunState) -> None:
    if not run.context.is_main:
        return
    train_set, eval_set, model = run.pipeline.train_set, run.pipeline.eval_set, run.model
    footprint = disk_estimate(run.config, model, eval_set is not None)
    run.log.write(
        {
            "event": "start",
            "step": run.step,
            "variant": model.variant,
            "model": run.config.model,
            "recipe": run.config.recipe,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "train_clips": len(train_set),
            "eval_clips": len(eval_set) if eval_set else 0,
            "skipped_train_rows": [str(p) for p in run.pipeline.problems],
            "skipped_eval_rows": [str(p) for p in eval_set.problems] if eval_set else [],
            "unpadded": run.unpadded,
            "unpadded_margin": run.config.unpadded_margin,
            "eot_penalty": run.config.eot_penalty,
            "objective": {"ce": run.objective.ce, "kl": run.objective.kl, **asdict(run.objective.states)},
            "world_size": run.context.world_size,
            "resumed_from": str(run.resumed_from) if run.resumed_from else None,
            "disk_bytes": asdict(footprint),
        }
    )
    logger.info("%s", footprint.summary(run.output))
    logger.info(
        "training %s (%s) on %d clips, %s input, %d process(es)",
        run.config.model,
        model.variant,
        len(train_set),
        "unpadded" if run.unpadded else "30-s padded",
        run.context.world_size,
    )


# --------------------------------------------------------------------------------------------------------------------
# One step


def _before_step(run: RunState) -> None:
    """The schedules of this step: staged training, the transplant's fade and gates, the switch to unpadded input."""
    config = run.config
    staged = run.step < config.stage_steps
    if staged != run.staged:
        policy = config.stage_policy if staged else config.train_policy
        select_trainable(run.model, policy)
        if run.staged is not None and run.context.is_main:
            run.log.write({"event": "stage", "step": run.step, "policy": policy})
            logger.info("step %d: --stage-steps done; training %s from here on", run.step, policy)
    if run.schedule is not None:
        apply_schedule(run.model, run.schedule, run.step)
    if staged != run.staged:  # after the schedule, which freezes scheduled gates
        run.staged = staged
        _wrap_student(run)
    if run.unpadded_from is not None and not run.unpadded and run.step >= run.unpadded_from:
        _switch_to_unpadded(run)


def _switch_to_unpadded(run: RunState) -> None:
    """The encoder's table is gone: from here on the encoder sees each clip's own frames."""
    position = run.pipeline.sampler.position
    run.pipeline.close()
    run.model.configure(unpadded=True)
    run.pipeline = build_pipeline(run.model, run.train, run.eval, run.config, True, run.cache, run.context, False)
    run.pipeline.sampler.position = position
    if run.context.is_main:
        logger.info("step %d: the absolute tables are gone; training continues on unpadded input", run.step)
        run.log.write({"event": "input", "step": run.step, "unpadded": True})


def _optimizer_step(run: RunState):
    """``grad_accum`` micro-batches, then one clipped optimizer and scheduler step. Returns (grad norm, lr used)."""
    config = run.config
    for micro in range(config.grad_accum):
        batch = next(run.pipeline.batches)
        run.position += 1
        for row in batch.replaced_rows:
            logger.warning(
                "%s, row %d could not be decoded and was replaced in this batch", run.pipeline.train_set.source, row
            )
        batch = prepare_batch(batch, run.position, config, run.device)
        # DDP synchronises gradients on the last micro-batch of a step only.
        sync = micro == config.grad_accum - 1 or not run.context.enabled
        with contextlib.nullcontext() if sync else run.student.no_sync():
            loss, stats, n_tokens = micro_batch_loss(
                run.student,
                run.teacher_embedding,
                batch,
                run.objective,
                run.context,
                config.grad_accum,
                run.autocast_dtype,
            )
            if not math.isfinite(stats["loss"]):
                _stop_non_finite(run, stats["loss"])
            run.scaler.scale(loss).backward()
        _accumulate(run.window, stats, n_tokens)
    run.scaler.unscale_(run.optimizer)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used
    with warnings.catch_warnings():
        # With fp16 the scaler skips steps whose gradients overflowed (the first ones, while it calibrates); the
        # schedule still advances by one step, which is what torch warns about here.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.window["steps"] += 1
    run.pipeline.sampler.position = run.position
    return float(grad_norm), lr


def _after_step(run: RunState, grad_norm: float, lr: float, progress: tqdm) -> None:
    config = run.config
    if run.step % config.log_every == 0 or run.step == config.steps:
        record = _train_record(run, grad_norm, lr)
        if run.context.is_main:
            run.log.write(record)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", audio_s_per_s=f"{record['audio_seconds_per_second']:.1f}"
            )
        run.window = _new_window()
    progress.update(1)
    if config.eval_every and run.step % config.eval_every == 0:
        _evaluate(run)
    if config.save_every and run.step % config.save_every == 0:
        _save(run)


def _new_window() -> Dict[str, float]:
    """Sums over the steps since the last log record."""
    return {"steps": 0, "tokens": 0.0, "started": time.perf_counter()}


def _accumulate(window: Dict[str, float], stats: Dict[str, float], n_tokens: float) -> None:
    window["tokens"] += n_tokens
    for key, value in stats.items():
        window[key] = window.get(key, 0.0) + value


def _train_record(run: RunState, grad_norm: float, lr: float) -> Dict[str, Any]:
    """The log record of the steps since the last one: per-token cross-entropy and KL, each state term's mean
    squared error, the total loss per step, speed."""
    window, objective = run.window, run.objective
    elapsed = time.perf_counter() - window["started"]
    tokens = max(window["tokens"], 1.0)
    run.final_loss = window.get("ce", 0.0) / tokens if objective.ce > 0 else window.get("loss", 0.0) / window["steps"]
    record = {
        "event": "train",
        "step": run.step,
        "loss": run.final_loss,
        "total_loss": window.get("loss", 0.0) / window["steps"],
        "lr": lr,
        "grad_norm": grad_norm,
        "audio_seconds_per_second": window.get("seconds", 0.0) / max(elapsed, 1e-9),
        "seconds_per_step": elapsed / window["steps"],
    }
    if objective.kl > 0:
        record["kl"] = window.get("kl", 0.0) / tokens
    for kind in objective.states.active:
        record[kind] = window.get(kind, 0.0) / max(window.get(f"{kind}_count", 0.0), 1.0)
    if run.schedule is not None:
        record["table_scale"] = run.model.encoder.table_scale
    return record


def _stop_non_finite(run: RunState, loss: float) -> None:
    kept = f"the last good checkpoint is {str(run.last_saved)!r}" if run.last_saved else "no checkpoint was written yet"
    message = (
        f"training stopped: the loss became {loss} at step {run.step + 1} ({kept}); lower --lr, lengthen "
        "--warmup-steps or keep --grad-clip on"
    )
    if run.context.is_main:
        run.log.write({"event": "error", "step": run.step + 1, "message": message})
    raise TrainingError(message)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, the end


def _evaluate(run: RunState) -> None:
    """Validation on the evaluation set (rank 0); the best model by WER is kept in ``best/``."""
    run.last_eval_step = run.step
    if run.context.is_main and run.pipeline.eval_set is not None:
        metrics = validation_metrics(run.model, run.pipeline.eval_set, run.config.batch_size, run.device)
        run.log.write({"event": "eval", "step": run.step, **metrics})
        logger.info(
            "step %d: validation loss %.4f, WER %.2f%%, CER %.2f%% (%d clips, %d capped, %.1f s)",
            run.step,
            metrics["loss"],
            100 * metrics["wer"],
            100 * metrics["cer"],
            metrics["n_clips"],
            metrics["capped"],
            metrics["seconds"],
        )
        if run.best_wer is None or metrics["wer"] < run.best_wer:
            run.best_wer, run.best_step = metrics["wer"], run.step
            best = run.output / "best"
            best.mkdir(exist_ok=True)
            run.last_model_file = (run.step, atomic_torch_save(_saved_model(run), best / MODEL_FILE))
            atomic_write_text(best / "metrics.json", json.dumps(jsonable({"step": run.step, **metrics}), indent=2))
    run.context.barrier()


def _save(run: RunState) -> None:
    same = _file_of_this_step(run)
    run.last_save_step = run.step
    if run.context.is_main:
        state = {
            "step": run.step,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "sampler": run.pipeline.sampler.state_dict(),
            "rng": rng_state(),
            "config": asdict(run.config),
            "variant": run.model.variant,
            "dims": asdict(run.model.dims),
            "trained_unpadded": run.unpadded,
            "world_size": run.context.world_size,
            "best_wer": run.best_wer,
            "best_step": run.best_step,
            "settings_history": run.settings_history,
            "holdout": run.holdout,
        }
        checkpoint = checkpoint_dict(run.model)
        dtype = SAVE_DTYPES[run.config.save_dtype]
        state["exact_weights"] = rounded_weights(checkpoint["model_state_dict"], dtype)
        model = same if same is not None else cast_checkpoint(checkpoint, dtype)
        run.last_saved = save_step_checkpoint(run.output, run.step, model, state, run.config.keep_last)
        run.last_model_file = (run.step, run.last_saved / MODEL_FILE)
        run.log.write({"event": "checkpoint", "step": run.step, "path": str(run.last_saved)})
    run.context.barrier()


def _saved_model(run: RunState) -> dict:
    """The model's checkpoint dict with its weights in --save-dtype."""
    return cast_checkpoint(checkpoint_dict(run.model), SAVE_DTYPES[run.config.save_dtype])


def _file_of_this_step(run: RunState) -> Optional[Path]:
    """A model file this run wrote at the current step (so in its --save-dtype), or None: a later file of the same
    weights links to it instead of holding another copy. A transplant's model changes between its last step and
    the end (the schedule's final values), so it links nothing."""
    if run.schedule is not None or run.last_model_file is None:
        return None
    step, path = run.last_model_file
    return path if step == run.step and path.is_file() else None


def _finish(run: RunState) -> FinetuneResult:
    model = run.model
    if run.schedule is not None:
        apply_schedule(model, run.schedule, run.step)
        model = _finish_transplant(model, run.schedule, run.log, run.context)
    model_path = None
    if run.context.is_main:
        same = _file_of_this_step(run) if model is run.model and run.schedule is None else None
        if same is not None:
            model_path = link_or_copy(same, run.output / MODEL_FILE)
        else:
            dtype = SAVE_DTYPES[run.config.save_dtype]
            model_path = atomic_torch_save(cast_checkpoint(checkpoint_dict(model), dtype), run.output / MODEL_FILE)
        run.log.write(
            {
                "event": "end",
                "step": run.step,
                "model": str(model_path),
                "best_wer": run.best_wer,
                "best_step": run.best_step,
                "config": asdict(run.config),
            }
        )
        plot_curves(run.output / LOG_FILE, run.output / CURVES_FILE)
    run.context.barrier()
    eval_set = run.pipeline.eval_set
    skipped = {
        "train": [str(p) for p in run.pipeline.problems],
        "eval": [str(p) for p in eval_set.problems] if eval_set else [],
    }
    return FinetuneResult(
        model,
        run.step,
        run.output,
        model_path,
        run.last_saved,
        run.final_loss,
        run.best_wer,
        run.best_step,
        run.log.records,
        skipped,
    )


def _transplant_schedule(config: FinetuneConfig) -> Optional[TransplantSchedule]:
    """The fade of the tables and the opening of the gates: the tables fade over half the run unless told otherwise,
    and scheduled gates open while they fade. A target whose decoder keeps its learned table fades the encoder's."""
    if not config.transplant:
        return None
    anneal_steps = config.transplant_anneal_steps
    anneal_steps = max(1, config.steps // 2) if anneal_steps is None else anneal_steps
    gate_steps = None
    if config.transplant_gates == "scheduled":
        gate_steps = anneal_steps if config.transplant_gate_steps is None else config.transplant_gate_steps
    gate_start = (
        config.transplant_anneal_start if config.transplant_gate_start is None else config.transplant_gate_start
    )
    decoder_turns_rotary = parse_variant(config.variant or "rotary").decoder.rotary
    return TransplantSchedule(
        anneal_start=config.transplant_anneal_start,
        anneal_steps=anneal_steps,
        shape=config.transplant_shape,
        sides=config.transplant_sides if decoder_turns_rotary else "encoder",
        gate_start=gate_start,
        gate_steps=gate_steps,
    )


def _finish_transplant(
    model: WhisperRope, schedule: TransplantSchedule, log: TrainingLog, context: DistributedContext
) -> WhisperRope:
    """Turn a finished transplant into its plain target variant; otherwise keep (and say why) the hybrid."""
    if not finishes(schedule, model):
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
