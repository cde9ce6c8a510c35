"""Synthetic speech corpora: text spoken by Debian's ``espeak-ng``, ``flite`` and ``festival``, written as 16 kHz mono
FLAC.

A corpus is a directory with one folder and one JSONL manifest per split::

    OUT/<split>.jsonl          {"audio": "<split>/<id>.flac", "text": ..., "id": ..., "duration": seconds,
                                "engine": ..., "voice": ..., "speed": ..., "pitch": ...} per clip
    OUT/<split>/<id>.flac      16-bit PCM FLAC, 16 kHz, mono

Building is deterministic: the synthesisers have no randomness, resampling is ``soxr`` (no dither) and FLAC is
written by libsndfile, so the same clips give byte-identical audio and manifests (with the same tool versions, which
`tool_versions` reports). Which sentences and voices make up a corpus is the caller's choice; the benchmark recipe
is ``benchmarks/build_corpus.py``.
"""

import functools
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
ENGINES = ("espeak-ng", "flite", "festival")
#: The Debian package of each engine's program (festival's is ``text2wave``).
PROGRAMS = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "text2wave"}
#: espeak-ng's default speaking rate in words per minute (``speed`` 1.0).
ESPEAK_DEFAULT_WPM = 175


@dataclass(frozen=True)
class Voice:
    """How a clip is spoken.

    engine: ``espeak-ng``, ``flite`` or ``festival``.
    name: an espeak-ng voice with optional variant (``en-us``, ``en+f3``), a flite voice (``slt``, ``awb``,
        ``rms``, ``kal16``) or a festival voice (``kal_diphone``, ``ked_diphone``, ``cmu_us_slt_arctic_hts``: Debian's
        ``festvox-kallpc16k``, ``festvox-kdlpc16k``, ``festvox-us-slt-hts``).
    speed: relative speaking rate; espeak-ng speaks ``175 * speed`` words per minute, flite and festival stretch
        durations by ``1 / speed``.
    pitch: espeak-ng's pitch (0-99, default 50), or flite's mean F0 in Hz; None keeps the voice's default (festival
        voices take none).
    """

    engine: str
    name: str
    speed: float = 1.0
    pitch: Optional[int] = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown speech engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if not self.speed > 0:
            raise ValueError(f"voice speed must be positive, got {self.speed}")

    def command(self, text: str, wav_path: str) -> List[str]:
        """The synthesiser's command line that writes ``text`` to ``wav_path``."""
        if self.engine == "espeak-ng":
            command = ["espeak-ng", "-v", self.name, "-s", str(round(ESPEAK_DEFAULT_WPM * self.speed)), "-w", wav_path]
            if self.pitch is not None:
                command += ["-p", str(self.pitch)]
            return command + ["--", text]
        if self.engine == "festival":  # reads the text on stdin (`stdin`)
            stretch = f"(Parameter.set 'Duration_Stretch {1 / self.speed:.4f})"
            return ["text2wave", "-eval", f"(voice_{self.name})", "-eval", stretch, "-o", wav_path]
        command = ["flite", "-voice", self.name, "--setf", f"duration_stretch={1 / self.speed:.4f}"]
        if self.pitch is not None:
            command += ["--setf", f"int_f0_target_mean={self.pitch}"]
        return command + ["-t", text, "-o", wav_path]

    def stdin(self, text: str) -> Optional[str]:
        """What the synthesiser reads on its standard input (festival's text), or None."""
        return text if self.engine == "festival" else None


@dataclass(frozen=True)
class ClipSpec:
    """One clip to synthesise: ``id`` names the file ``<split>/<id>.flac``."""

    id: str
    text: str
    voice: Voice


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak ``text`` with ``voice``; returns float32 samples, shape (n_samples,), 16 kHz mono, in [-1, 1].

    Raises RuntimeError when the synthesiser is missing, fails, or produces no audio.
    """
    with tempfile.TemporaryDirectory(prefix="whisper_rope_tts_") as tmp:
        wav_path = os.path.join(tmp, "speech.wav")
        command = voice.command(text, wav_path)
        try:
            completed = subprocess.run(command, input=voice.stdin(text), capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise RuntimeError(_not_installed(voice.engine)) from None
        if completed.returncode != 0 or not os.path.exists(wav_path):
            reason = " ".join(completed.stderr.split()) or f"exit status {completed.returncode}"
            raise RuntimeError(f"{voice.engine} voice {voice.name!r} failed on {text!r}: {reason}")
        audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if len(audio) == 0:
        raise RuntimeError(f"{voice.engine} voice {voice.name!r} produced no audio for {text!r}")
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def synthesize_within(
    text: str, voice: Voice, seconds: Tuple[float, float], attempts: int = 3
) -> Tuple[np.ndarray, Voice]:
    """Speak ``text``, re-speaking it faster or slower until it lasts between ``seconds[0]`` and ``seconds[1]``.

    Each retry scales the speed by the ratio of the duration to a target just inside the range (durations are not
    exactly proportional to 1 / speed: the engines add fixed pauses); after ``attempts`` retries the last rendering
    is returned whatever its length. Returns the samples and the voice (with the speed) that spoke them.
    """
    low, high = seconds
    if not 0 < low < high:
        raise ValueError(f"clip duration range must be two increasing positive seconds, got {seconds}")
    audio = synthesize(text, voice)
    for _ in range(attempts):
        duration = len(audio) / SAMPLE_RATE
        if low <= duration <= high:
            break
        target = min(max(duration, low + 0.05 * (high - low)), high - 0.05 * (high - low))
        voice = replace(voice, speed=round(voice.speed * duration / target, 3))
        audio = synthesize(text, voice)
    return audio, voice


@functools.cache
def _installed_voices(engine: str) -> Tuple[frozenset, frozenset]:
    """(voices, espeak-ng variants) the engine knows; espeak-ng and flite silently fall back to a default voice when
    given an unknown name, and festival fails with exit status 0, so names are checked against these lists first."""
    try:
        if engine == "festival":
            output = subprocess.run(
                ["festival", "--pipe"], input="(print (voice.list))", capture_output=True, text=True, check=False
            ).stdout
            return frozenset(output.strip().strip("()").split()), frozenset()
        if engine == "flite":
            output = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=False).stdout
            return frozenset(output.split(":", 1)[-1].split()), frozenset()
        voices = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=False).stdout
        variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        raise RuntimeError(_not_installed(engine)) from None
    names = set()
    for line in voices.splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 5:
            names.update({columns[1], columns[3], columns[4], columns[4].rsplit("/", 1)[-1]})
    variant_names = {line.split()[4].rsplit("/", 1)[-1] for line in variants.splitlines()[1:] if len(line.split()) >= 5}
    return frozenset(names), frozenset(variant_names)


def check_voice(voice: Voice) -> None:
    """Raise ValueError when the engine does not know the voice (or espeak-ng the variant after ``+``)."""
    names, variants = _installed_voices(voice.engine)
    name, _, variant = voice.name.partition("+")
    listing = {"flite": "flite -lv", "festival": "echo '(print (voice.list))' | festival --pipe"}.get(
        voice.engine, "espeak-ng --voices"
    )
    if name not in names:
        raise ValueError(f"{voice.engine} has no voice {name!r} (see `{listing}`)")
    if variant and variant not in variants:
        raise ValueError(f"espeak-ng has no voice variant {variant!r} (see `espeak-ng --voices=variant`)")


def _not_installed(engine: str) -> str:
    package = "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts" if engine == "festival" else engine
    return f"speech engine {engine!r} is not installed (apt-get install {package})"


def _synthesize_clip(job: "tuple[ClipSpec, str, str, Optional[Tuple[float, float]]]") -> dict:
    """Worker: synthesise one clip into ``out_dir/<split>/<id>.flac`` and return its manifest row."""
    clip, split, out_dir, seconds = job
    if seconds is None:
        audio, voice = synthesize(clip.text, clip.voice), clip.voice
    else:
        audio, voice = synthesize_within(clip.text, clip.voice, seconds)
    relative = f"{split}/{clip.id}.flac"
    sf.write(os.path.join(out_dir, relative), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return {
        "audio": relative,
        "text": clip.text,
        "id": clip.id,
        "duration": round(len(audio) / SAMPLE_RATE, 4),
        "engine": voice.engine,
        "voice": voice.name,
        "speed": voice.speed,
        "pitch": voice.pitch,
    }


def tool_versions() -> Dict[str, str]:
    """The version line of each engine's ``--version`` (the audio depends on them)."""
    versions = {}
    for tool in ("espeak-ng", "flite", "festival"):
        try:
            output = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:
            versions[tool] = "not installed"
            continue
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        versions[tool] = next((line for line in lines if "version" in line.lower()), lines[0] if lines else "")
    return versions


def build_corpus(
    out_dir: "str | os.PathLike",
    splits: Dict[str, Sequence[ClipSpec]],
    jobs: int = 2,
    progress: bool = True,
    overwrite: bool = False,
    seconds: Optional[Tuple[float, float]] = None,
) -> Dict[str, Path]:
    """Synthesise every split into ``out_dir`` (layout in the module docstring); returns the manifest paths.

    jobs: synthesiser processes run at once (each clip is one espeak-ng/flite run plus resampling and FLAC writing).
    seconds: (shortest, longest) clip duration; clips outside are re-spoken at another speed (`synthesize_within`)
        and the manifest records the speed used.
    overwrite: replace existing split folders and manifests of the same names; without it they are an error.
    Manifest rows are in the order of the clips given, whatever order the workers finish in.
    """
    out = Path(out_dir)
    for split, clips in splits.items():
        ids = [clip.id for clip in clips]
        if len(set(ids)) != len(ids):
            raise ValueError(f"split {split!r} has repeated clip ids; every clip needs its own file name")
    for engine, name in sorted({(clip.voice.engine, clip.voice.name) for clips in splits.values() for clip in clips}):
        check_voice(Voice(engine, name))
    for split in splits:
        for path in (out / split, out / f"{split}.jsonl"):
            if path.exists():
                if not overwrite:
                    raise ValueError(
                        f"{path} already exists: choose another output folder, or replace it with overwrite=True "
                        "(--overwrite)"
                    )
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        (out / split).mkdir(parents=True)

    jobs_list = [(clip, split, str(out), seconds) for split, clips in splits.items() for clip in clips]
    rows = _run(jobs_list, max(1, jobs), progress)
    manifests: Dict[str, Path] = {}
    for split in splits:
        manifest = out / f"{split}.jsonl"
        with open(manifest, "w", encoding="utf-8") as fp:
            for (_, clip_split, _, _), row in zip(jobs_list, rows):
                if clip_split == split:
                    fp.write(json.dumps(row, ensure_ascii=False) + "\n")
        manifests[split] = manifest
    return manifests


def _run(jobs: List[tuple], workers: int, progress: bool) -> List[dict]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synthesising", unit="clip", disable=not progress)
    try:
        if workers == 1:
            return [_tick(bar, _synthesize_clip(job)) for job in jobs]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return [_tick(bar, row) for row in pool.map(_synthesize_clip, jobs, chunksize=4)]
    finally:
        bar.close()


def _tick(bar, row: dict) -> dict:
    bar.update(1)
    return row
