"""Label-free evaluation: clips held out of the training audio, scored against the teacher's own transcripts.

A run that adapts a checkpoint from untranscribed audio has no references to compute a WER against. What it must
keep is what the source model says about the audio when fed the 30-s window it was trained on; so some clips are
kept out of training, the teacher transcribes them (cached like every teacher target), and the student is scored
against those transcripts: 0 % means it says exactly what the source model says.

Held-out clips are as short as the training clips, and a model is only as general as the lengths it is scored on;
so the final evaluation (`every_length_holdout`) also joins them, with pauses, into windows of 5-30 s and into one
recording of them all (over 30 s when they allow it, read through the long-form paths), whose references are their
clips' transcripts joined in order. On those the source model, fed 30-s windows, scores above 0 % too.
"""

import json
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import soundfile
from whisper.audio import SAMPLE_RATE

from ..audio import load_audio
from ..data import (
    DataError,
    Example,
    Manifest,
    Window,
    WindowPlan,
    check_audio,
    compose_windows,
    joined_window,
    load_examples,
    read_manifest,
    window_audio,
)
from ..errors import AudioError
from ..fs.atomic import atomic_write, atomic_write_text
from ..model import WhisperRope
from .teacher_cache import TargetSpec, TeacherCache

TRAIN_MANIFEST = "train-without-holdout.jsonl"
HOLDOUT_MANIFEST = "holdout.jsonl"
#: The held-out clips, windows of several of them and one recording of them all (`every_length_holdout`).
EVERY_LENGTH_MANIFEST = "holdout-every-length.jsonl"
EVERY_LENGTH_AUDIO = "holdout-audio"
#: The length buckets over 5 s (seconds) that windows of joined held-out clips fill, and how many each at most.
WINDOW_BUCKETS = ((5.0, 10.0), (10.0, 20.0), (20.0, 30.0))
WINDOWS_PER_BUCKET = 3
#: Pauses between joined held-out clips (seconds).
HOLDOUT_PAUSE = (0.3, 1.0)
#: The most clips a recipe holds out by default.
MAX_DEFAULT_HOLDOUT = 24
#: The fields of a held-out clip written to its manifest and stored in the run's training state.
ROW_FIELDS = ("audio", "text", "language", "start", "end", "prompt")


def default_holdout(clips: int) -> int:
    """A recipe's hold-out for ``clips`` clips: a fifth of them (at least 1), at most `MAX_DEFAULT_HOLDOUT`."""
    return min(MAX_DEFAULT_HOLDOUT, max(1, clips // 5))


def planned_holdout(train, count: Optional[int], batch_size: int, require_text: bool = False) -> int:
    """The number of clips of the training manifest ``train`` to hold out: ``count``, or `default_holdout` for None.

    Reads only the manifest (no audio), so a run calls it before loading any model. Raises DataError, naming the
    options to change, when the hold-out keeps back every clip or leaves fewer than one batch (``batch_size``
    clips) to train on; a manifest without clips is left to `load_examples`, which says why none is usable.
    """
    manifest = read_manifest(train, require_text=require_text)
    clips = len(manifest.examples)
    count = default_holdout(clips) if count is None else count
    if count:
        holdout_examples(train, count)
    if clips and clips - count < batch_size:  # (no clips at all: loading the data says why)
        if count:
            size = f"has {clips} clips: holding out {count} (--eval-holdout) leaves {clips - count} to train on,"
            options = "--batch-size or --eval-holdout"
        else:
            size, options = f"has {clips} clips,", "--batch-size"
        raise DataError(
            f"{manifest.source!r} {size} fewer than one batch (--batch-size {batch_size}); give a smaller {options}, "
            "or more clips"
        )
    return count


def holdout_examples(train, count: int) -> List[Example]:
    """The examples of the training manifest ``train``, of which ``count`` are to be held out; raises DataError
    when fewer than ``count + 1`` usable rows exist. Reads only the manifest (no audio)."""
    manifest = read_manifest(train, require_text=False)
    examples = list(manifest.examples)
    if len(examples) <= count:
        raise DataError(
            f"--eval-holdout {count} keeps back every clip of {manifest.source!r} ({len(examples)} rows): hold out "
            "fewer, or give --eval"
        )
    return examples


def split_holdout(
    train, count: int, seed: int, output: Path, kept: Optional[Sequence[Dict[str, Any]]] = None
) -> Tuple[Path, List[Example]]:
    """Write the training examples minus the held-out ones to ``output/TRAIN_MANIFEST``.

    The ``count`` held-out clips are drawn (seeded) among the clips whose audio decodes, so that an unreadable file
    never takes a slot; ``kept`` (the `holdout_rows` a resumed run stored) holds out those clips again instead, so
    that a resume never trains on a clip it evaluates on, whatever the folder holds now. Returns (that manifest, the
    held-out examples). Raises DataError as `holdout_examples`, or when fewer than ``count`` clips decode.
    """
    examples = holdout_examples(train, count if kept is None else 0)
    held_out = _draw(examples, count, seed, str(train)) if kept is None else [_example(row) for row in kept]
    keys = {_key(example) for example in held_out}
    path = _write_manifest(output / TRAIN_MANIFEST, [e for e in examples if _key(e) not in keys])
    return path, held_out


def holdout_rows(examples: Sequence[Example]) -> List[Dict[str, Any]]:
    """The held-out clips as plain rows (without the teacher's text), for the run's training state."""
    return [_row(_without_text(example)) for example in examples]


def read_holdout(path: Path) -> List[Example]:
    """The held-out examples of a run's ``HOLDOUT_MANIFEST``."""
    return [_example(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _draw(examples: Sequence[Example], count: int, seed: int, source: str) -> List[Example]:
    """``count`` examples in a seeded random order, skipping those whose audio does not decode; in manifest order."""
    order = list(range(len(examples)))
    random.Random(f"holdout:{seed}").shuffle(order)
    chosen: List[int] = []
    for index in order:
        if len(chosen) == count:
            break
        if _decodes(examples[index]):
            chosen.append(index)
    if len(chosen) < count:
        raise DataError(
            f"--eval-holdout {count}: only {len(chosen)} clips of {source!r} have audio that decodes; hold out fewer"
        )
    return [examples[index] for index in sorted(chosen)]


def _decodes(example: Example) -> bool:
    """Whether the clip passes the training set's audio check (header, span, length) and its samples decode."""
    if not check_audio(Manifest(example.audio, [example])).examples:
        return False
    try:
        load_audio(example.audio, start=example.start, end=example.end)
    except AudioError:
        return False
    return True


def _key(example: Example) -> Tuple[str, Optional[float], Optional[float]]:
    return example.audio, example.start, example.end


def _row(example: Example) -> Dict[str, Any]:
    return {key: getattr(example, key) for key in ROW_FIELDS if getattr(example, key) is not None}


def _example(row: Dict[str, Any]) -> Example:
    return Example(row=0, **{key: row.get(key) for key in ROW_FIELDS})


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


def every_length_holdout(holdout: Path, output: Path, seed: int) -> Path:
    """``output/EVERY_LENGTH_MANIFEST``: the labelled held-out clips of ``holdout``, up to `WINDOWS_PER_BUCKET`
    windows of several of them per bucket of `WINDOW_BUCKETS`, and one recording of all of them in order (pauses
    of 0.3-1 s between), the joined audio written under ``output/EVERY_LENGTH_AUDIO``; references joined in the
    clips' order."""
    clips = check_audio(Manifest(str(holdout), read_holdout(holdout)), max_seconds=None).examples
    clips = [replace(clip, row=i + 1) for i, clip in enumerate(clips)]
    rng = random.Random(f"holdout-recording:{seed}")
    everything = joined_window(clips, [rng.uniform(*HOLDOUT_PAUSE) for _ in clips[1:]])
    folder = output / EVERY_LENGTH_AUDIO
    folder.mkdir(exist_ok=True)
    rows = [_row(clip) for clip in clips]
    named = [*((f"window-{i:02d}", w) for i, w in enumerate(_bucket_windows(clips, seed))), ("all-clips", everything)]
    for name, window in named:
        path = folder / f"{name}.flac"
        audio = window_audio(window, whole=True)
        atomic_write(path, lambda handle, audio=audio: soundfile.write(handle, audio, SAMPLE_RATE, format="FLAC"))
        rows.append({"audio": str(path.resolve()), "text": window.text, **_language_of(window)})
    return atomic_write_text(
        output / EVERY_LENGTH_MANIFEST, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )


def _bucket_windows(clips: Sequence[Example], seed: int) -> List[Window]:
    """Up to `WINDOWS_PER_BUCKET` windows of two or more ``clips`` in each of `WINDOW_BUCKETS`, bucket by bucket."""
    plan = WindowPlan(
        min_seconds=5.0, single_share=0.0, part_share=0.0, previous_share=0.0, pause=HOLDOUT_PAUSE, sets=4
    )
    chosen: Dict[Tuple[float, float], List[Window]] = {bucket: [] for bucket in WINDOW_BUCKETS}
    for window in compose_windows(clips, plan, seed, allow_timestamps=False):
        for low, high in WINDOW_BUCKETS:
            taken = chosen[(low, high)]
            if low < window.duration <= high and len(window.pieces) > 1 and len(taken) < WINDOWS_PER_BUCKET:
                taken.append(window)
    return [window for bucket in WINDOW_BUCKETS for window in chosen[bucket]]


def _language_of(window: Window) -> Dict[str, str]:
    return {"language": window.language} if window.language else {}


def _without_text(example: Example) -> Example:
    return Example(**{**asdict(example), "text": None})


def _write_manifest(path: Path, examples: Sequence[Example]) -> Path:
    """JSON lines with absolute audio paths (the manifest lives in the run's directory, not beside the audio)."""
    return atomic_write_text(path, "".join(json.dumps(_row(e), ensure_ascii=False) + "\n" for e in examples))
