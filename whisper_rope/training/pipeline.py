"""What the training loop feeds the model: the datasets, the teacher's cached targets, and the batches.

One pipeline per form of input: 30-s windows, or each clip's own frames (``unpadded``) in length-bucketed batches;
with ``--windows every-length`` the clips are first composed into windows of every length (`data.windows`).
When the run learns from the teacher, its targets are filled into the cache before the first step (each rank fills
its share of the clips), and the DataLoader workers read them with the audio.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..data import (
    MAX_CLIP_SECONDS,
    Batch,
    BucketBatchSampler,
    Collator,
    SpeechDataset,
    WindowPlan,
    composed_dataset,
    load_examples,
    make_loader,
    spec_augment_,
    with_examples,
    with_previous_text,
)
from ..model import WhisperRope
from ..transcription.single_window import check_single_window
from ..weights.packages import resolve_cache_dir
from .config import FinetuneConfig
from .distributed import DistributedContext
from .teacher_cache import TargetSpec, TeacherCache, TeacherTargetsCollator, TeacherTargetsDataset, read_entry

logger = logging.getLogger("whisper_rope")


@dataclass
class Pipeline:
    """The training set (with teacher targets when the run uses them), the evaluation set, and the endless batches."""

    train_set: torch.utils.data.Dataset
    eval_set: Optional[SpeechDataset]
    sampler: BucketBatchSampler
    loader: torch.utils.data.DataLoader
    unpadded: bool

    def __post_init__(self) -> None:
        self.batches: Iterator[Batch] = iter(self.loader)

    def close(self) -> None:
        """Stops the loader's worker processes now (the iterator holds them; dropping it shuts them down), before
        another pipeline starts its own."""
        self.batches = iter(())

    @property
    def problems(self) -> list:
        """Skipped rows of the training set."""
        return list(getattr(self.train_set, "problems", []))


def teacher_cache(config: FinetuneConfig, teacher: WhisperRope, kinds: tuple) -> TeacherCache:
    """The cache of ``teacher``'s targets this run reads (``--teacher-cache``, else whisper_rope's cache directory)."""
    root = Path(config.teacher_cache).expanduser() if config.teacher_cache else resolve_cache_dir() / "teacher-targets"
    transcripts = "teacher" if config.distill_only else "reference"
    return TeacherCache(root, teacher, TargetSpec(kinds=kinds, margin=config.unpadded_margin, transcripts=transcripts))


def build_pipeline(
    model: WhisperRope,
    train,
    eval,
    config: FinetuneConfig,
    unpadded: bool,
    cache: Optional[TeacherCache],
    context: DistributedContext,
    progress: bool = True,
) -> Pipeline:
    """Datasets, teacher targets and loader for one form of input. Raises `DataError` for unusable data."""
    options = dict(strict=config.strict, language=config.language, task=config.task, margin=config.unpadded_margin)
    composing = config.windows == "every-length"
    if composing and config.max_window_seconds > MAX_CLIP_SECONDS:
        if not unpadded:
            raise ValueError(f"--max-window-seconds {config.max_window_seconds:g} needs unpadded input")
        # The teacher reads such windows half by half (`TeacherCache`): their targets are its transcripts joined.
        check_single_window(model, f"--max-window-seconds {config.max_window_seconds:g}")
    train_set = load_examples(
        train,
        model,
        pad_30s=not unpadded,
        require_text=not config.distill_only,
        teacher_30s=cache is not None,
        max_seconds=None if composing else MAX_CLIP_SECONDS,
        **options,
    )
    if composing:
        train_set = composed_dataset(train_set, window_plan(config), config.seed)
    eval_set = None if eval is None else load_examples(eval, model, pad_30s=not unpadded, **options)
    collate = Collator(train_set.tokenizer(0).eot, not unpadded)
    if cache is not None:
        if composing:
            train_set = _with_previous_texts(cache, train_set, context, config, progress)
        entries = _filled_entries(cache, train_set, context, config, progress)
        train_set.teacher_30s = False  # the cache holds all the teacher says: no 30-s window per item any more
        train_set = TeacherTargetsDataset(train_set, entries, cache.spec.transcripts, cache.spec.kinds)
        collate = TeacherTargetsCollator(collate)
    sampler = BucketBatchSampler(
        train_set.durations,
        config.batch_size,
        config.seed,
        bucket=unpadded,
        rank=context.rank,
        world_size=context.world_size,
    )
    loader = make_loader(
        train_set, sampler, config.num_workers, pin_memory=context.device.type == "cuda", collate_fn=collate
    )
    return Pipeline(train_set, eval_set, sampler, loader, unpadded)


def window_plan(config: FinetuneConfig) -> WindowPlan:
    """How ``--windows every-length`` composes the training windows."""
    return WindowPlan(
        max_seconds=config.max_window_seconds,
        single_share=config.single_clip_share,
        part_share=config.clip_part_share,
        previous_share=config.previous_text_share,
        timestamp_share=config.timestamp_share,
        sets=config.window_sets,
        branch_share=config.branch_share,
        branch_first_share=config.branch_first_share,
    )


def _with_previous_texts(
    cache: TeacherCache, dataset: SpeechDataset, context: DistributedContext, config: FinetuneConfig, progress: bool
) -> SpeechDataset:
    """``dataset`` with each window that follows a previous text (`Window.after`) given that window's teacher
    transcript as its prompt. The teacher transcribes the followed windows first (cached: the full fill reads them),
    then labels the following ones after their prompts, as upstream's loop decodes."""
    windows = dataset.examples
    followed = sorted({w.after for w in windows if getattr(w, "after", None) is not None})
    if not followed or cache.spec.transcripts != "teacher":
        return dataset
    subset = with_examples(dataset, [windows[i] for i in followed])
    entries = _filled_entries(cache, subset, context, config, progress)
    texts = {}
    for position, (index, path) in enumerate(zip(followed, entries)):
        entry = None if path is None else read_entry(path, frozenset())
        if entry is not None:
            tokenizer = subset.tokenizer(position)
            texts[index] = tokenizer.decode([t for t in entry["text_tokens"].tolist() if t < tokenizer.eot])
    prompted = with_previous_text(windows, texts)
    logger.info(
        "%s: %d windows follow the teacher's transcript of the window before them",
        dataset.source,
        sum(w.prompt is not None and w.after is not None for w in prompted),
    )
    return with_examples(dataset, prompted)


def _filled_entries(
    cache: TeacherCache, dataset: SpeechDataset, context: DistributedContext, config: FinetuneConfig, progress: bool
) -> list:
    """Every clip's cache entry: each rank computes its share of the missing ones, then all read the whole set."""
    batch = max(1, config.batch_size // context.world_size)
    if context.enabled:
        share = list(range(context.rank, len(dataset), context.world_size))
        cache.fill(dataset, context.device, batch, config.num_workers, progress and context.is_main, indices=share)
        context.barrier()
    return cache.fill(dataset, context.device, batch, config.num_workers, progress and context.is_main)


def prepare_batch(batch: Batch, position: int, config: FinetuneConfig, device: torch.device) -> Batch:
    """SpecAugment (seeded by run position and clip, so any number of ranks and a resume agree), then onto the
    device. The teacher's targets were computed on the clean audio."""
    if config.spec_augment:
        for row, index in enumerate(batch.indices):
            generator = torch.Generator().manual_seed(hash((config.seed, position, index)) & 0x7FFFFFFF)
            spec_augment_(batch.mel[row], batch.frames[row], generator)
    return batch.to(device)
