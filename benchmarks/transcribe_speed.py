"""Transcription speed on the CPU: upstream openai-whisper, whisper_rope's presets, faster-whisper, same clips.

Two measurements, each system timed in this one process after a warm-up, runs interleaved across systems (so that
load from other processes hits them alike), median of the runs, in CPU seconds of the process (robust to other jobs
on a shared machine) and wall seconds:

1. RoPE overhead, controlled: the ``whisper`` and ``rotary`` presets of tiny.en encode one 30-s window and decode a
   fixed number of tokens (end-of-text suppressed, so both do exactly the same steps), greedy and beam 5.
2. End to end, upstream ``transcribe`` settings: short clips (the committed speech fixtures, 2-4 s) and long-form
   recordings (whole fixtures joined with silences, 45 s and 100 s, and ``--spoken`` recordings of 60 s of sentences
   synthesised with espeak-ng, flite and festival voices), greedy and beam 5, temperature 0 without fallback,
   decoding capped at ``--sample-len`` tokens per window for every system (224 per chunk for the batched long-form
   systems, whose chunks are never re-windowed). Systems: faster-whisper int8 and fp32 one file at a time, its
   ``BatchedInferencePipeline`` (int8, batch 8, timestamps on; long-form only, since it batches the chunks of one
   file), upstream openai-whisper, and whisper_rope's presets in fp32 and ``compute_type="int8"``, one by one and
   through ``transcribe_many`` in batches of 8 (short clips batched across files; long-form recordings cut into
   voice-activity chunks decoded in batches). Reported: median seconds per set, ratio to faster-whisper int8, corpus
   WER with its word errors and reference words (jiwer, upstream's EnglishTextNormalizer).

The ``rotary`` preset here is tiny.en's pretrained weights with the positional tables swapped for RoPE and *no
fine-tuning*: it transcribes garbage (expected, see EXPERIMENTS.md) and loops until the token cap, so its
end-to-end rows measure the cost of capped garbage, not of a usable model; the controlled measurement is the fair
speed comparison. Unpadded rows encode only each window's real frames.

``--finetuned PATH`` adds a rotary model fine-tuned unpadded (e.g. the end of ``whisper-rope finetune --transplant
--transplant-unpadded``), padded and unpadded, one by one and in batches: the usable counterpart of the ``rotary``
rows. ``--clips MANIFEST`` takes the short clips from a manifest (JSONL/CSV/TSV with ``audio`` and ``text``, clips up
to 10 s, the first ``--max-clips``) instead of the committed fixtures, e.g. the domain that model was trained for.

Usage: ``python3 benchmarks/transcribe_speed.py [--runs 3] [--threads 2] [--finetuned PATH] [--clips MANIFEST]
[--no-long-form] [--spoken 3] [--json results.json]``; ``--quick`` (one short clip, one run, no long-form) only
checks that the script works.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import whisper
from whisper.normalizers import EnglishTextNormalizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import whisper_rope  # noqa: E402
from whisper_rope.audio import SAMPLE_RATE, load_audio  # noqa: E402
from whisper_rope.data import read_manifest  # noqa: E402
from whisper_rope.transcription.transcribe import transcribe_many  # noqa: E402
from whisper_rope.weights import packages  # noqa: E402

SPEECH = ROOT / "tests" / "fixtures" / "speech"
MODEL = "tiny.en"
LONG_SECONDS = (45.0, 100.0)
# Long-form recordings of synthesised sentences (`spoken_long_clips`): voices (engine, name, speed) taken in turn.
SPOKEN_VOICES = (
    ("flite", "slt", 1.0),
    ("espeak-ng", "en-us", 0.85),
    ("flite", "awb", 1.0),
    ("festival", "kal_diphone", 1.0),
    ("espeak-ng", "en+f3", 0.85),
    ("flite", "rms", 1.0),
)
SPOKEN_SECONDS = 60.0
CHUNK_TOKEN_CAP = 224  # upstream's default sample_len (n_text_ctx // 2): batched speech chunks are never re-windowed
Clip = Tuple[str, np.ndarray, str]  # name, 16-kHz waveform, reference text
Transcriber = Callable[[Sequence[np.ndarray], Optional[int]], List[str]]


def short_clips() -> List[Clip]:
    return [(p.stem, load_audio(p), p.with_suffix(".txt").read_text().strip()) for p in sorted(SPEECH.glob("*.flac"))]


def manifest_clips(manifest: Path, limit: int, max_seconds: float = 10.0) -> List[Clip]:
    """The first ``limit`` transcribed clips of at most ``max_seconds`` in a manifest (any format
    `whisper_rope.data.read_manifest` reads)."""
    clips = []
    for example in read_manifest(manifest).examples:
        audio = load_audio(example.audio, start=example.start, end=example.end)
        if len(audio) <= max_seconds * SAMPLE_RATE:
            clips.append((Path(example.audio).stem, audio, example.text))
        if len(clips) == limit:
            break
    if not clips:
        raise SystemExit(f"--clips {manifest}: no clip of at most {max_seconds:g} s")
    return clips


def joined(name: str, utterances: Iterable[Tuple[np.ndarray, str]], seconds: float) -> Clip:
    """Utterances (16-kHz audio, text) one after another, separated by 0.8-2.0 s of silence, as many whole ones as
    fit in ``seconds``, then silence up to ``seconds``. Reads ``utterances`` only as far as it needs."""
    pieces, texts, n = [], [], 0
    for i, (audio, text) in enumerate(utterances):
        silence = np.zeros(int((0.8 + 0.4 * (i % 4)) * SAMPLE_RATE), dtype=np.float32)
        if n + len(audio) > seconds * SAMPLE_RATE:
            break
        pieces += [audio, silence]
        texts.append(text)
        n += len(audio) + len(silence)
    audio = np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)]
    audio = np.pad(audio, (0, int(seconds * SAMPLE_RATE) - len(audio)))
    return name, audio, " ".join(texts)


def long_clip(clips: Sequence[Clip], seconds: float, offset: int) -> Clip:
    """Whole fixtures `joined` into ``seconds`` of audio.

    Each pass over the fixtures takes them in another order (steps 1, 3, 5, 7 through the list from ``offset``), so
    that no window repeats the previous one's sentences in the same sequence.
    """

    def fixtures():
        for i in range(10_000):
            _, audio, text = clips[(offset + (1, 3, 5, 7)[(i // len(clips)) % 4] * i) % len(clips)]
            yield audio, text

    return joined(f"long_{seconds:.0f}s", fixtures(), seconds)


def spoken_long_clips(count: int) -> List[Clip]:
    """``count`` recordings of `SPOKEN_SECONDS` each: sentences of the evaluation grammar (benchmarks/sentences.py,
    seed = the recording's number) spoken by one synthesiser voice per recording (`SPOKEN_VOICES` in turn),
    `joined`. Deterministic: the synthesisers have no randomness (benchmarks/corpus.py)."""
    from corpus import Voice, synthesize  # the sibling modules; they need the synthesisers only here
    from sentences import EVALUATION, sentences

    def spoken(number: int, voice: Voice):
        for text in sentences(EVALUATION, 100, seed=number):
            yield synthesize(text, voice), text

    recordings = []
    for number in range(count):
        engine, name, speed = SPOKEN_VOICES[number % len(SPOKEN_VOICES)]
        voice = Voice(engine, name, speed)
        label = f"spoken_{number}_{engine}_{name}"
        recordings.append(joined(label, spoken(number, voice), SPOKEN_SECONDS))
    return recordings


def unpadded(model, value: bool):
    """``model`` unpadded (or not) inside the ``with`` block; upstream's model has no such setting."""
    return model.using(unpadded=value) if isinstance(model, whisper_rope.WhisperRope) else contextlib.nullcontext()


def load_torch_models(finetuned: Optional[Path] = None) -> dict:
    """tiny.en converted from the installed package: upstream's model and whisper_rope's two presets; and the
    fine-tuned rotary model when given (fp32, like the others)."""
    models = {
        "upstream": whisper.load_model(str(packages.cached_conversion(MODEL)), device="cpu"),
        "whisper": whisper_rope.load_model(MODEL, device="cpu"),
        "whisper int8": whisper_rope.load_model(MODEL, device="cpu", compute_type="int8"),
        "rotary": whisper_rope.load_model(MODEL, variant="rotary", device="cpu"),
    }
    if finetuned is not None:
        model = whisper_rope.load_model(str(finetuned), device="cpu").float()
        if model.encoder.needs_full_window:
            raise SystemExit(
                f"--finetuned {finetuned}: variant {model.variant} has an encoder table; it cannot run unpadded"
            )
        models["finetuned"] = model
    return models


def torch_systems(models: dict, sample_len: int) -> Dict[str, Transcriber]:
    """Transcribers for upstream openai-whisper and whisper_rope."""
    upstream, ours, rotary = models["upstream"], models["whisper"], models["rotary"]

    def options(beam: Optional[int]) -> dict:
        return dict(language="en", temperature=0.0, beam_size=beam, fp16=False, sample_len=sample_len, verbose=None)

    def one_by_one(model, use_unpadded: bool = False) -> Transcriber:
        def run(audios, beam):
            with unpadded(model, use_unpadded):
                return [whisper.transcribe(model, a, **options(beam))["text"] for a in audios]

        return run

    def batched(model, use_unpadded: bool = False) -> Transcriber:
        def run(audios, beam):
            settings = {**options(beam), "sample_len": chunk_cap(audios, sample_len)}
            with unpadded(model, use_unpadded):
                return [r["text"] for r in transcribe_many(model, audios, batch_size=8, **settings)]

        return run

    finetuned = models.get("finetuned")
    extra = (
        {}
        if finetuned is None
        else {
            "fine-tuned rotary": one_by_one(finetuned, False),
            "fine-tuned rotary unpadded": one_by_one(finetuned, True),
            "fine-tuned rotary unpadded, batch 8": batched(finetuned, True),
        }
    )
    return {
        "openai-whisper": one_by_one(upstream),
        "whisper_rope whisper": one_by_one(ours),
        "whisper_rope whisper, batch 8": batched(ours),
        "whisper_rope whisper int8": one_by_one(models["whisper int8"]),
        "whisper_rope whisper int8, batch 8": batched(models["whisper int8"]),
        "whisper_rope rotary": one_by_one(rotary),
        "whisper_rope rotary unpadded": one_by_one(rotary, True),
        "whisper_rope rotary unpadded, batch 8": batched(rotary, True),
        **extra,
    }


def chunk_cap(audios: Sequence[np.ndarray], sample_len: int) -> int:
    """The token cap of a batched system: ``sample_len`` for clips of at most 30 s; for longer recordings, whose
    chunks hold up to 30 s of speech each and are never re-windowed, at least upstream's default of half the text
    context (224), so that the cap does not cut a chunk's text."""
    return sample_len if all(len(a) <= 30 * SAMPLE_RATE for a in audios) else max(sample_len, CHUNK_TOKEN_CAP)


def faster_whisper_systems(threads: int, sample_len: int) -> Dict[str, Transcriber]:
    try:
        from faster_whisper import BatchedInferencePipeline, WhisperModel
    except ImportError:
        print("faster-whisper is not installed: its rows are skipped", file=sys.stderr)
        return {}
    directory = str(packages.find_installed_model(MODEL).config_dir)

    def system(compute_type: str) -> Transcriber:
        model = WhisperModel(directory, device="cpu", compute_type=compute_type, cpu_threads=threads)

        def run(audios, beam):
            texts = []
            for audio in audios:
                segments, _ = model.transcribe(
                    audio,
                    language="en",
                    beam_size=beam or 1,
                    temperature=0.0,
                    max_new_tokens=sample_len,
                    condition_on_previous_text=True,
                    vad_filter=False,
                )
                texts.append("".join(segment.text for segment in segments))
            return texts

        return run

    def batched_pipeline() -> Transcriber:
        model = BatchedInferencePipeline(
            WhisperModel(directory, device="cpu", compute_type="int8", cpu_threads=threads)
        )

        def run(audios, beam):
            texts = []
            for audio in audios:
                segments, _ = model.transcribe(
                    audio,
                    language="en",
                    beam_size=beam or 1,
                    temperature=0.0,
                    max_new_tokens=chunk_cap(audios, sample_len),
                    without_timestamps=False,  # timestamped segments, as ours
                    batch_size=8,
                )
                texts.append("".join(segment.text for segment in segments))
            return texts

        return run

    return {
        "faster-whisper int8": system("int8"),
        "faster-whisper fp32": system("float32"),
        "faster-whisper int8 batched pipeline, batch 8": batched_pipeline(),
    }


def timed(function: Callable[[], object]) -> Tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, value) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    value = function()
    return time.process_time() - cpu, time.perf_counter() - wall, value


def interleaved(
    tasks: Dict[str, Callable[[], object]], runs: int, warmup: bool
) -> Dict[str, Tuple[float, float, object]]:
    """Median CPU seconds, median wall seconds and last value of each task, run ``runs`` times in turn.

    CPU time is the primary number: on a machine shared with other jobs, wall time measures their load as much as
    ours, while the CPU time of a process running a fixed number of threads does not (much).
    """
    if warmup:
        for task in tasks.values():
            task()
    cpu: Dict[str, List[float]] = {name: [] for name in tasks}
    wall: Dict[str, List[float]] = {name: [] for name in tasks}
    values: Dict[str, object] = {}
    for _ in range(runs):
        for name, task in tasks.items():
            cpu_s, wall_s, values[name] = timed(task)
            cpu[name].append(cpu_s)
            wall[name].append(wall_s)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name]), values[name]) for name in tasks}


def rope_overhead(models: dict, runs: int, n_tokens: int, warmup: bool) -> List[dict]:
    """Encoder forward and fixed-length decoding, ``whisper`` vs ``rotary`` preset, on one padded window."""
    models = {name: models[name] for name in ("whisper", "rotary")}
    audio = load_audio(SPEECH / "espeak_en.flac")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))[None]
    eot = whisper.tokenizer.get_tokenizer(False).eot
    rows = []
    for label, beam in (
        ("encoder forward", 0),
        (f"greedy, {n_tokens} tokens", None),
        (f"beam 5, {n_tokens} tokens", 5),
    ):

        def task(model, beam=beam):
            if beam == 0:
                with torch.no_grad():
                    return model.encoder(mel)
            options = whisper.DecodingOptions(
                language="en",
                fp16=False,
                beam_size=beam,
                sample_len=n_tokens,
                without_timestamps=True,
                suppress_tokens=[-1, eot],
            )
            return model.decode(mel, options)

        result = interleaved({name: (lambda m=model: task(m)) for name, model in models.items()}, runs, warmup)
        (whisper_s, whisper_wall, _), (rotary_s, rotary_wall, _) = result["whisper"], result["rotary"]
        rows.append(
            {
                "measure": label,
                "whisper_s": whisper_s,
                "rotary_s": rotary_s,
                "ratio": rotary_s / whisper_s,
                "wall_ratio": rotary_wall / whisper_wall,
            }
        )
    return rows


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> Tuple[int, int]:
    """(word errors: substitutions + deletions + insertions, reference words) over all clips of a set, both sides
    through upstream's EnglishTextNormalizer."""
    import jiwer

    normalise = EnglishTextNormalizer()
    measures = jiwer.process_words([normalise(t) for t in references], [normalise(t) for t in hypotheses])
    errors = measures.substitutions + measures.deletions + measures.insertions
    return errors, errors + measures.hits - measures.insertions


def end_to_end(systems: Dict[str, Transcriber], sets: Dict[str, List[Clip]], runs: int, warmup: bool) -> List[dict]:
    """One row per (clip set, decoding, system). Only the first measurement warms up: it leaves every system warm."""
    rows = []
    for set_name, clips in sets.items():
        audios = [audio for _, audio, _ in clips]
        references = [text for _, _, text in clips]
        seconds_of_audio = sum(len(a) for a in audios) / SAMPLE_RATE
        for decoding, beam in (("greedy", None), ("beam 5", 5)):
            tasks = {
                name: (lambda run=run: run(audios, beam))
                for name, run in systems.items()
                if set_name != "short" or "pipeline" not in name  # faster-whisper batches chunks of one file only
            }
            results = interleaved(tasks, runs, warmup)
            warmup = False
            base = results.get("faster-whisper int8", (None, None))
            for name, (cpu_s, wall_s, texts) in results.items():
                errors, words = word_errors(references, texts)
                rows.append(
                    {
                        "set": set_name,
                        "audio_s": seconds_of_audio,
                        "decoding": decoding,
                        "system": name,
                        "cpu_s": cpu_s,
                        "wall_s": wall_s,
                        "ratio_to_fw_int8": cpu_s / base[0] if base[0] else None,
                        "wall_ratio_to_fw_int8": wall_s / base[1] if base[1] else None,
                        "wer": errors / words,
                        "word_errors": errors,
                        "words": words,
                    }
                )
            print(f"done: {set_name}, {decoding}", file=sys.stderr, flush=True)
    return rows


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def markdown(rope_rows: List[dict], rows: List[dict]) -> str:
    lines = [
        "| RoPE overhead (tiny.en, one 30-s window) | `whisper` CPU s | `rotary` CPU s | rotary / whisper, CPU | "
        "rotary / whisper, wall |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['measure']} | {r['whisper_s']:.3f} | {r['rotary_s']:.3f} | {r['ratio']:.3f} | {r['wall_ratio']:.3f} |"
        for r in rope_rows
    ]
    lines += [
        "",
        "| clips | decoding | system | CPU s | × fw int8, CPU | wall s | × fw int8, wall | WER % (errors / words) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio_to_fw_int8']:.2f}" if r["ratio_to_fw_int8"] else "-"
        wall_ratio = f"{r['wall_ratio_to_fw_int8']:.2f}" if r["wall_ratio_to_fw_int8"] else "-"
        clips = f"{r['set']} ({r['audio_s']:.0f} s audio)"
        lines.append(
            f"| {clips} | {r['decoding']} | {r['system']} | {r['cpu_s']:.2f} | {ratio} | {r['wall_s']:.2f} | "
            f"{wall_ratio} | {100 * r['wer']:.1f} ({r['word_errors']} / {r['words']}) |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and CTranslate2 (1: CPU time then equals compute time)",
    )
    parser.add_argument("--sample-len", type=int, default=128, help="token cap per 30-s window, for every system")
    parser.add_argument("--rope-tokens", type=int, default=48, help="tokens decoded in the RoPE overhead measurement")
    parser.add_argument("--quick", action="store_true", help="one short clip, one run, no long-form: a smoke test")
    parser.add_argument(
        "--finetuned",
        type=Path,
        default=None,
        help="also time this rotary checkpoint fine-tuned unpadded (padded, unpadded, batched)",
    )
    parser.add_argument(
        "--clips",
        type=Path,
        default=None,
        help="short clips from this manifest (JSONL/CSV/TSV: audio, text) instead of the fixtures",
    )
    parser.add_argument("--max-clips", type=int, default=20, help="clips taken from --clips (those up to 10 s)")
    parser.add_argument("--no-long-form", action="store_true", help="time the short clips only")
    parser.add_argument(
        "--spoken",
        type=int,
        default=3,
        help=f"long-form recordings of synthesised sentences ({SPOKEN_SECONDS:.0f} s each) added to the two built from "
        "the fixtures",
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time only these systems (names as in the table, e.g. 'faster-whisper int8')",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    runs = 1 if args.quick else args.runs
    sample_len = 16 if args.quick else args.sample_len
    clips = manifest_clips(args.clips, args.max_clips) if args.clips else short_clips()
    sets = {"short": clips[:1]} if args.quick else {"short": clips}
    if not (args.quick or args.no_long_form):
        sets["long-form"] = [long_clip(clips, s, offset=i * 3) for i, s in enumerate(LONG_SECONDS)]
        sets["long-form"] += spoken_long_clips(args.spoken)

    models = load_torch_models(args.finetuned)
    rope_rows = rope_overhead(
        models, 1 if args.quick else 2 * runs + 1, 4 if args.quick else args.rope_tokens, not args.quick
    )
    systems = {**faster_whisper_systems(args.threads, sample_len), **torch_systems(models, sample_len)}
    if args.systems:
        unknown = [name for name in args.systems if name not in systems]
        if unknown:
            parser.error(f"--systems: unknown {unknown[0]!r}; the systems are: {', '.join(map(repr, systems))}")
        systems = {name: run for name, run in systems.items() if name in args.systems}
    rows = end_to_end(systems, sets, runs, warmup=not args.quick)

    command = "python3 benchmarks/transcribe_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"CPU: {cpu_model()}, {args.threads} threads (torch {torch.__version__}, int8 kernels: quantized engine "
        f"{torch.backends.quantized.engine}); runs: {runs}; token cap {sample_len} per window "
        f"({CHUNK_TOKEN_CAP} per chunk for batched long-form); load average {os.getloadavg()[0]:.1f}; "
        f"command: `{command.strip()}`"
    )
    print(header)
    print(markdown(rope_rows, rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rope_overhead": rope_rows, "end_to_end": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
