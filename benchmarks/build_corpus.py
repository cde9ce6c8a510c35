"""Build the offline speech benchmark corpus: three splits of synthetic English speech, 16 kHz mono FLAC.

    python benchmarks/build_corpus.py --out DIR --seed S [--small] [--jobs 2]

Splits (``DIR/<split>.jsonl`` manifests, audio under ``DIR/<split>/``):

    train       espeak-ng voices speaking sentences of the training grammar (home, past-tense statements)
    in-domain   the same espeak-ng voices speaking sentences of the evaluation grammar (travel, questions)
    retained    flite voices speaking other sentences of the evaluation grammar: speech pretrained tiny.en already
                transcribes well, where forgetting shows after fine-tuning
    retained-festival
                festival voices (another synthesiser, diphone and HTS) speaking yet other sentences of the evaluation
                grammar: a second retained set, from a synthesiser no training split uses
    train-diverse
                only with ``--diverse N``: N more training clips (training grammar, sentences not in ``train``) from
                espeak-ng accents x voice variants at wider speeds and pitches, 2-6 s long: more varied training
                audio for label-free adaptation (the teacher transcribes it; its text is only for reference)

No sentence occurs in two splits, and the two grammars share no word other than a few function words
(``sentences.FUNCTION_WORDS``), so a decoder that memorises training phrases gains nothing on the evaluation splits.
The same seed gives byte-identical manifests and audio (same espeak-ng/flite versions: see ``DIR/corpus.json``).
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from corpus import ClipSpec, Voice, build_corpus, tool_versions  # the sibling modules
from sentences import EVALUATION, TRAIN, sentences

#: Clips per split: full size, and --small for CI.
SIZES = {"train": 960, "in-domain": 240, "retained": 240, "retained-festival": 240}
SMALL_SIZES = {"train": 12, "in-domain": 6, "retained": 6, "retained-festival": 6}
#: Clips shorter or longer than this are re-spoken at another speed.
SECONDS = (2.0, 5.0)

# espeak-ng voices (language + variant) that zero-shot tiny.en transcribes with roughly 10-30 % WER: intelligible,
# but far enough from natural speech that fine-tuning has something to learn.
ESPEAK_VOICES = ("en-us", "en-us+f2", "en+m3", "en+f3", "en-gb-x-rp+m1", "en+f1")
ESPEAK_SPEED = (0.75, 1.0)  # 131-175 words per minute
ESPEAK_PITCH = (35, 65)
# flite voices tiny.en transcribes with about 5-7 % WER (the diphone voices "kal16" and "kal" are left out: about
# 14 % and 18 %).
FLITE_VOICES = ("slt", "awb", "rms")
FLITE_SPEED = (0.9, 1.1)
# festival voices: two diphone voices (American English, male) and one HTS voice (female).
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
FESTIVAL_SPEED = (0.9, 1.1)
# train-diverse: espeak-ng's English accents crossed with its voice variants (whispered variants left out: not the
# speech tiny.en hears), wider speed and pitch ranges, clips up to 6 s.
DIVERSE_ACCENTS = (
    "en-gb",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
DIVERSE_SPEED = (0.7, 1.3)
DIVERSE_PITCH = (20, 80)
DIVERSE_SECONDS = (2.0, 6.0)


def _voices(
    engine: str, names: Sequence[str], speed: tuple, pitch: "tuple | None", count: int, rng: random.Random
) -> List[Voice]:
    """``count`` voices cycling through ``names`` (each used equally often), with random speed and pitch."""
    result = []
    for index in range(count):
        chosen_pitch = rng.randint(*pitch) if pitch else None
        result.append(Voice(engine, names[index % len(names)], round(rng.uniform(*speed), 3), chosen_pitch))
    return result


def corpus_plan(seed: int, sizes: Dict[str, int]) -> Dict[str, List[ClipSpec]]:
    """Which sentence each clip says and with which voice; a pure function of the seed and the sizes."""
    train_text = sentences(TRAIN, sizes["train"], seed)
    # One draw for every evaluation split (a prefix does not depend on how many follow): no sentence in two splits.
    evaluation_text = sentences(EVALUATION, sizes["in-domain"] + sizes["retained"] + sizes["retained-festival"], seed)
    in_domain_text = evaluation_text[: sizes["in-domain"]]
    retained_text = evaluation_text[sizes["in-domain"] : sizes["in-domain"] + sizes["retained"]]
    festival_text = evaluation_text[sizes["in-domain"] + sizes["retained"] :]
    rng = random.Random(f"voices:{seed}")
    voices = {
        "train": _voices("espeak-ng", ESPEAK_VOICES, ESPEAK_SPEED, ESPEAK_PITCH, sizes["train"], rng),
        "in-domain": _voices("espeak-ng", ESPEAK_VOICES, ESPEAK_SPEED, ESPEAK_PITCH, sizes["in-domain"], rng),
        "retained": _voices("flite", FLITE_VOICES, FLITE_SPEED, None, sizes["retained"], rng),
        "retained-festival": _voices(
            "festival", FESTIVAL_VOICES, FESTIVAL_SPEED, None, sizes["retained-festival"], rng
        ),
    }
    texts = {
        "train": train_text,
        "in-domain": in_domain_text,
        "retained": retained_text,
        "retained-festival": festival_text,
    }
    return {
        split: [
            ClipSpec(f"{split}-{index:04d}", text, voice)
            for index, (text, voice) in enumerate(zip(texts[split], voices[split]))
        ]
        for split in texts
    }


def espeak_variants() -> List[str]:
    """The voice variants of the installed espeak-ng (``espeak-ng --voices=variant``), whispered ones left out."""
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[4].rsplit("/", 1)[-1] for line in listing.splitlines()[1:] if len(line.split()) >= 5]
    return [name for name in names if name.lower() not in ("whisper", "whisperf")]


def diverse_plan(seed: int, count: int, exclude: Sequence[str], variants: Sequence[str]) -> List[ClipSpec]:
    """``count`` clips of the training grammar, no sentence of ``exclude``, each with a random accent+variant, speed
    and pitch; a pure function of its arguments (seed 0 draws with 7, as the published run did)."""
    texts = sentences(TRAIN, count, seed + 7, exclude=exclude)
    rng = random.Random(f"diverse:{seed + 7}")
    clips = []
    for index, text in enumerate(texts):
        name = f"{rng.choice(DIVERSE_ACCENTS)}+{rng.choice(variants)}"
        voice = Voice("espeak-ng", name, round(rng.uniform(*DIVERSE_SPEED), 3), rng.randint(*DIVERSE_PITCH))
        clips.append(ClipSpec(f"diverse-{index:04d}", text, voice))
    return clips


def main(argv: "Sequence[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; existing splits need --overwrite)")
    parser.add_argument(
        "--seed", type=int, default=0, help="chooses sentences, voices, speeds and pitches (default: 0)"
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"a CI-sized corpus ({', '.join(f'{k} {v}' for k, v in SMALL_SIZES.items())} clips) "
        f"instead of {', '.join(f'{k} {v}' for k, v in SIZES.items())}",
    )
    parser.add_argument(
        "--diverse", type=int, default=0, metavar="N", help="also build train-diverse with N clips (default: none)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="synthesiser processes run at once")
    parser.add_argument("--overwrite", action="store_true", help="replace existing splits in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = parser.parse_args(argv)

    sizes = SMALL_SIZES if args.small else SIZES
    plan = corpus_plan(args.seed, sizes)
    try:
        manifests = build_corpus(
            args.out, plan, jobs=args.jobs, progress=args.progress, overwrite=args.overwrite, seconds=SECONDS
        )
        if args.diverse > 0:
            clips = diverse_plan(args.seed, args.diverse, [c.text for c in plan["train"]], espeak_variants())
            extra = {"train-diverse": clips}
            manifests.update(
                build_corpus(args.out, extra, args.jobs, args.progress, args.overwrite, seconds=DIVERSE_SECONDS)
            )
    except (ValueError, RuntimeError, OSError) as error:
        print(f"build_corpus.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1

    summary = {"seed": args.seed, "clip_seconds": list(SECONDS), "tools": tool_versions(), "splits": {}}
    for split, manifest in manifests.items():
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
        durations = [row["duration"] for row in rows]
        summary["splits"][split] = {
            "manifest": manifest.name,
            "clips": len(rows),
            "hours": round(sum(durations) / 3600, 4),
            "seconds": [min(durations), max(durations)],
            "words": sum(len(row["text"].split()) for row in rows),
            "voices": sorted({f"{row['engine']}:{row['voice']}" for row in rows}),
            "sentences": "training grammar" if split.startswith("train") else "evaluation grammar",
        }
        print(
            f"{split:10s} {len(rows):5d} clips  {sum(durations) / 60:6.1f} min  "
            f"{min(durations):.2f}-{max(durations):.2f} s  -> {manifest}"
        )
    Path(args.out, "corpus.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
