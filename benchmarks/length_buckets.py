"""Evaluation sets by clip length: windows of every length bucket and long recordings, from the corpus's evaluation
splits, and the real-speech development set, ready for ``whisper-rope evaluate``.

    python benchmarks/length_buckets.py --corpus CORPUS --out DIR [--seed 0] [--windows 15] [--long 2] \
        [--long-seconds 180] [--real-dev ../shared/real-dev]

For each split (``in-domain``, ``retained``, ``retained-festival`` of ``benchmarks/build_corpus.py``) and each length
bucket of ``whisper_rope.evaluation.metrics.LENGTH_BUCKETS`` up to 30 s, ``--windows`` windows whose length falls in
the bucket are composed by `whisper_rope.data.windows` (the split's clips in a seeded order, joined with pauses of
0.3-1.5 s of silence, their texts joined in order) and written as ``DIR/<split>-<bucket>.jsonl`` with the audio
under ``DIR/<split>-<bucket>/``. ``--long`` recordings of about ``--long-seconds`` each are consecutive windows of
20-30 s joined with the same pauses (``DIR/<split>-long.jsonl``). From ``--real-dev`` (real recordings with shipped
transcripts, evaluation only) come ``DIR/real-dev.jsonl`` (its recordings as they are) and ``DIR/real-dev-long.jsonl``
(all of them joined into one recording of about a minute). ``DIR/length_buckets.json`` lists every manifest with its
row count and length range.

Rows: ``audio`` (relative to DIR), ``text``, ``duration`` (seconds), ``clips`` (the source audio, in order) and
``pauses`` (the silences between them, seconds). The same corpus, seed and options give the same sets.
"""

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from whisper.audio import SAMPLE_RATE  # noqa: E402

from whisper_rope.audio import load_audio  # noqa: E402
from whisper_rope.data import Example, check_audio, read_manifest  # noqa: E402
from whisper_rope.data.windows import Window, WindowPlan, compose_windows, window_audio  # noqa: E402
from whisper_rope.evaluation.metrics import LENGTH_BUCKETS  # noqa: E402

EVAL_SPLITS = ("in-domain", "retained", "retained-festival")
#: Pauses between joined clips (and between the windows of a long recording), seconds.
PAUSE = (0.3, 1.5)
#: (file-name slug, shortest, longest window in seconds) of the buckets up to 30 s, in `LENGTH_BUCKETS` order.
WINDOW_BUCKETS = (("0-5s", 0.0, 5.0), ("5-10s", 5.0, 10.0), ("10-20s", 10.0, 20.0), ("20-30s", 20.0, 30.0))
#: Window lengths that long recordings are made of.
LONG_PARTS = (20.0, 30.0)
#: The composition passes tried for one bucket before it is reported as short of windows.
MAX_PASSES = 20


def bucket_windows(clips: Sequence[Example], low: float, high: float, count: int, seed: int) -> List[Window]:
    """``count`` windows longer than ``low`` and at most ``high`` seconds, composed from ``clips`` (durations filled).

    Each pass of `compose_windows` uses every clip once, in a seeded order, drawing window lengths in
    ``low``..``high`` (at least 1 s); windows that came out shorter than ``low`` (the next clip did not fit), and
    windows of the same clips as an earlier one, are left out; the passes (other orders) give the first ``count``.
    Raises ValueError when the clips cannot fill the bucket."""
    plan = WindowPlan(
        min_seconds=max(low, 1.0), max_seconds=high, single_share=0.0, pause=PAUSE, sets=MAX_PASSES, centred=False
    )
    chosen, seen = [], set()
    for window in compose_windows(clips, plan, seed, allow_timestamps=False):
        if low < window.duration <= high and window.pieces not in seen:
            chosen.append(window)
            seen.add(window.pieces)
    if len(chosen) < count:
        raise ValueError(
            f"only {len(chosen)} windows of {low:g}-{high:g} s could be composed from {len(clips)} clips; "
            f"{count} were asked for (--windows)"
        )
    return chosen[:count]


def long_recordings(
    clips: Sequence[Example], count: int, seconds: float, seed: int
) -> List[Tuple[List[Window], List[float]]]:
    """``count`` long recordings, each (windows, pauses between them): consecutive windows of `LONG_PARTS` seconds
    from one pass over ``clips``, until a recording reaches ``seconds``. Raises ValueError when the clips run out."""
    plan = WindowPlan(
        min_seconds=LONG_PARTS[0], max_seconds=LONG_PARTS[1], single_share=0.0, pause=PAUSE, sets=1, centred=False
    )
    windows = compose_windows(clips, plan, seed, allow_timestamps=False)
    rng = random.Random(f"long:{seed}")
    recordings, parts, pauses, length = [], [], [], 0.0
    for window in windows:
        if len(recordings) == count:
            break
        if parts:
            pauses.append(rng.uniform(*PAUSE))
            length += pauses[-1]
        parts.append(window)
        length += float(window.duration or 0.0)
        if length >= seconds:
            recordings.append((parts, pauses))
            parts, pauses, length = [], [], 0.0
    if len(recordings) < count:
        raise ValueError(
            f"{len(clips)} clips hold only {len(recordings)} recordings of {seconds:g} s; "
            f"{count} were asked for (--long)"
        )
    return recordings


def joined(parts: Sequence[np.ndarray], pauses: Sequence[float]) -> np.ndarray:
    """(n_samples,) the ``parts`` with ``pauses`` seconds of silence between them (one pause fewer than parts)."""
    pieces = [parts[0]]
    for part, pause in zip(parts[1:], pauses):
        pieces += [np.zeros(round(pause * SAMPLE_RATE), dtype=np.float32), part]
    return np.concatenate(pieces)


def _write_set(out: Path, name: str, rows: List[Tuple[np.ndarray, dict]]) -> Dict[str, object]:
    """Write the audio of ``rows`` ((audio, row fields)) under ``out/name/`` as 16-bit FLAC and their manifest
    ``out/name.jsonl``; returns the set's summary."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, (audio, fields) in enumerate(rows):
        relative = f"{name}/{number:04d}.flac"
        sf.write(out / relative, audio, SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio": relative, **fields, "duration": round(len(audio) / SAMPLE_RATE, 3)}))
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    durations = [json.loads(line)["duration"] for line in lines]
    return {"manifest": f"{name}.jsonl", "rows": len(lines), "seconds": [min(durations), max(durations)]}


def _window_row(window: Window) -> Tuple[np.ndarray, dict]:
    fields = {"text": window.text, "clips": [piece.audio for piece in window.pieces], "pauses": list(window.pauses)}
    return window_audio(window), fields


def _long_row(windows: Sequence[Window], pauses: Sequence[float]) -> Tuple[np.ndarray, dict]:
    """A long recording: its windows' audio joined with ``pauses``, the clips and every pause in order."""
    audio = joined([window_audio(window) for window in windows], pauses)
    clips, all_pauses = [], []
    for i, window in enumerate(windows):
        if i:
            all_pauses.append(pauses[i - 1])
        clips += [piece.audio for piece in window.pieces]
        all_pauses += list(window.pauses)
    return audio, {"text": " ".join(window.text for window in windows), "clips": clips, "pauses": all_pauses}


def _clips(manifest: Path) -> List[Example]:
    """The transcribed clips of a manifest, durations filled; every row must be usable."""
    return check_audio(read_manifest(manifest, strict=True), strict=True, max_seconds=None).examples


def build_split(corpus: Path, split: str, out: Path, args: argparse.Namespace) -> Dict[str, object]:
    """Every bucket's windows and the long recordings of one split; returns their summaries by set name."""
    clips = _clips(corpus / f"{split}.jsonl")
    sets = {}
    for slug, low, high in WINDOW_BUCKETS:
        windows = bucket_windows(clips, low, high, args.windows, args.seed)
        sets[f"{split}-{slug}"] = _write_set(out, f"{split}-{slug}", [_window_row(w) for w in windows])
    if args.long:
        recordings = long_recordings(clips, args.long, args.long_seconds, args.seed)
        sets[f"{split}-long"] = _write_set(out, f"{split}-long", [_long_row(w, p) for w, p in recordings])
    return sets


def build_real_dev(real_dev: Path, out: Path, seed: int) -> Dict[str, object]:
    """``real-dev.jsonl`` (the recordings in place, absolute paths) and ``real-dev-long`` (all of them joined in
    manifest order with seeded pauses) from a folder with a ``manifest.jsonl``."""
    clips = _clips(real_dev / "manifest.jsonl")
    rows = [{"audio": clip.audio, "text": clip.text, "duration": round(float(clip.duration), 3)} for clip in clips]
    (out / "real-dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    durations = [row["duration"] for row in rows]
    sets = {"real-dev": {"manifest": "real-dev.jsonl", "rows": len(rows), "seconds": [min(durations), max(durations)]}}
    rng = random.Random(f"real-dev:{seed}")
    pauses = [rng.uniform(*PAUSE) for _ in clips[1:]]
    audio = joined([load_audio(clip.audio, start=clip.start, end=clip.end) for clip in clips], pauses)
    fields = {"text": " ".join(clip.text for clip in clips), "clips": [clip.audio for clip in clips], "pauses": pauses}
    sets["real-dev-long"] = _write_set(out, "real-dev-long", [(audio, fields)])
    return sets


def set_names(splits: Sequence[str], long: int, real_dev: bool) -> List[str]:
    """The names of the sets (manifest ``NAME.jsonl``, audio folder ``NAME/``) that `main` writes."""
    names = [f"{split}-{slug}" for split in splits for slug, _, _ in WINDOW_BUCKETS]
    names += [f"{split}-long" for split in splits] if long else []
    return names + (["real-dev", "real-dev-long"] if real_dev else [])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus of benchmarks/build_corpus.py")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--splits", nargs="+", default=list(EVAL_SPLITS), help="the corpus splits to compose from")
    parser.add_argument("--seed", type=int, default=0, help="chooses clip orders, window lengths and pauses")
    parser.add_argument("--windows", type=int, default=15, help="windows per split and length bucket")
    parser.add_argument("--long", type=int, default=2, help="long recordings per split (0: none)")
    parser.add_argument("--long-seconds", type=float, default=180.0, help="length of each long recording")
    parser.add_argument(
        "--real-dev", type=Path, help="a folder of real recordings with a manifest.jsonl (e.g. ../shared/real-dev)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace sets of the same names in --out")
    args = parser.parse_args(argv)
    if args.windows < 1 or args.long < 0 or args.long_seconds <= LONG_PARTS[1]:
        parser.error("--windows must be at least 1, --long at least 0 and --long-seconds more than 30")
    existing = [
        name
        for name in set_names(args.splits, args.long, args.real_dev is not None)
        if (args.out / f"{name}.jsonl").exists() or (args.out / name).exists()
    ]
    if existing and not args.overwrite:
        parser.error(f"{args.out / existing[0]} exists (and {len(existing) - 1} more sets): pass --overwrite")
    args.out.mkdir(parents=True, exist_ok=True)
    sets: Dict[str, object] = {}
    try:
        for split in args.splits:
            sets.update(build_split(args.corpus, split, args.out, args))
        if args.real_dev is not None:
            sets.update(build_real_dev(args.real_dev, args.out, args.seed))
    except (ValueError, OSError) as error:
        print(f"length_buckets.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    summary = {
        "seed": args.seed,
        "windows": args.windows,
        "long": args.long,
        "long_seconds": args.long_seconds,
        "buckets": [name for name, _ in LENGTH_BUCKETS],
        "sets": sets,
    }
    (args.out / "length_buckets.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for name, info in sets.items():
        low, high = info["seconds"]
        print(f"{name:28s} {info['rows']:4d} rows  {low:6.1f}-{high:6.1f} s  -> {args.out / info['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
