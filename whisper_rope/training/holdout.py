"""Label-free evaluation: clips held out of the training audio, scored against the teacher's own transcripts.

A run that adapts a checkpoint from untranscribed audio has no references to compute a WER against. What it must
keep is what the source model says about the audio when fed the 30-s window it was trained on; so some clips are
kept out of training, the teacher transcribes them (cached like every teacher target), and the student is scored
against those transcripts: 0 % means it says exactly what the source model says.
"""

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import List, Sequence, Tuple

from ..atomic import atomic_write_text
from ..data import DataError, Example, load_examples, read_manifest
from ..model import WhisperRope
from .teacher_cache import TargetSpec, TeacherCache

TRAIN_MANIFEST = "train-without-holdout.jsonl"
HOLDOUT_MANIFEST = "holdout.jsonl"


def holdout_examples(train, count: int) -> List[Example]:
    """The examples of the training manifest ``train``, of which ``count`` are to be held out; raises DataError
    when fewer than ``count + 1`` usable rows exist. Reads only the manifest (no audio), so a run calls it before
    loading any model."""
    manifest = read_manifest(train, require_text=False)
    examples = list(manifest.examples)
    if len(examples) <= count:
        raise DataError(
            f"--eval-holdout {count} keeps back every clip of {manifest.source!r} ({len(examples)} rows): hold out "
            "fewer, or give --eval"
        )
    return examples


def split_holdout(train, count: int, seed: int, output: Path) -> Tuple[Path, Sequence[Example]]:
    """Write the training examples minus ``count`` randomly chosen ones (seeded) to ``output/TRAIN_MANIFEST``.

    Returns (that manifest, the held-out examples). Raises DataError as `holdout_examples`.
    """
    examples = holdout_examples(train, count)
    chosen = set(random.Random(f"holdout:{seed}").sample(range(len(examples)), count))
    kept = [e for i, e in enumerate(examples) if i not in chosen]
    path = _write_manifest(output / TRAIN_MANIFEST, kept)
    return path, [e for i, e in enumerate(examples) if i in chosen]


def teacher_references(
    examples: Sequence[Example], teacher: WhisperRope, cache_root: Path, output: Path, language=None, task="transcribe"
) -> Path:
    """Write ``examples`` with the teacher's greedy 30-s transcripts as their text to ``output/HOLDOUT_MANIFEST``."""
    unlabelled = _write_manifest(output / HOLDOUT_MANIFEST, [_without_text(e) for e in examples])
    dataset = load_examples(
        unlabelled, teacher, pad_30s=False, teacher_30s=True, require_text=False, language=language, task=task
    )
    cache = TeacherCache(cache_root, teacher, TargetSpec(kinds=(), transcripts="teacher"))
    entries = cache.fill(dataset, next(teacher.parameters()).device, progress=False)
    texts = []
    for index, path in enumerate(entries):
        tokens = cache.read(path)["text_tokens"].tolist() if path is not None else []
        texts.append(dataset.tokenizer(index).decode(tokens).strip())
    labelled = [Example(**{**asdict(e), "text": text}) for e, text in zip(dataset.examples, texts)]
    return _write_manifest(output / HOLDOUT_MANIFEST, labelled)


def _without_text(example: Example) -> Example:
    return Example(**{**asdict(example), "text": None})


def _write_manifest(path: Path, examples: Sequence[Example]) -> Path:
    """JSON lines with absolute audio paths (the manifest lives in the run's directory, not beside the audio)."""
    keys = ("audio", "text", "language", "start", "end", "prompt")
    lines = []
    for example in examples:
        row = {key: getattr(example, key) for key in keys if getattr(example, key) is not None}
        lines.append(json.dumps(row, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")
