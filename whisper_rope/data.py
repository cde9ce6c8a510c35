"""Training data: manifests, audio decoding, log-mel features, target token sequences and batching.

A manifest lists one utterance per row with the fields ``audio`` (a path, relative paths resolved against the
manifest's folder), ``text``, and optionally ``language``, ``start``/``end`` (seconds into the file) and ``prompt``
(previous-context text, given to the decoder after ``<|startofprev|>`` and never trained on). Formats: JSON lines
(``.jsonl``/``.json``), ``.csv`` and ``.tsv`` with a header row, or a directory of audio files each with a
same-named ``.txt`` transcript.

Rows that cannot be used (malformed lines, missing columns, missing or undecodable audio, empty transcripts, clips
over 30 s, token sequences longer than the decoder's context) are skipped and listed with their row numbers; with
``strict`` the first one is an error.

Features follow the model: an encoder with an absolute table gets upstream's 30-s window (the audio padded with
silence to 480000 samples, then ``whisper.audio.log_mel_spectrogram``: 3000 frames); a rotary-only encoder gets
each clip's own frames, cut where unpadded transcription cuts them (`unpadded_features`), zero-padded to the
longest clip of the batch, with the real frame counts passed to the model so that padding is masked.

Shapes: mel ``(b, n_mels, n_frames)`` with 100 frames per second; tokens/labels ``(b, n_tokens)``.
"""

import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer

from .audio import audio_duration, load_audio
from .errors import AudioError, WhisperRopeError
from .model import real_frame_counts

logger = logging.getLogger("whisper_rope")

PathLike = Union[str, os.PathLike]

#: Longest clip a Whisper window holds, in seconds.
MAX_CLIP_SECONDS = N_SAMPLES / SAMPLE_RATE
#: Shortest clip that yields two mel frames (one encoder position).
MIN_CLIP_SECONDS = 2 * HOP_LENGTH / SAMPLE_RATE
#: Label value that excludes a position from the loss (``torch.nn.functional.cross_entropy``'s ignore_index).
IGNORE_INDEX = -100
#: File suffixes read as audio when a directory is given instead of a manifest.
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac", ".wma")
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
# A clip's span may run this far past the file's end (rounded segment times) before the row is rejected.
_END_TOLERANCE_S = 0.05


class DataError(WhisperRopeError, ValueError):
    """A manifest or training example that cannot be used."""


@dataclass(frozen=True)
class Example:
    """One utterance of a manifest.

    audio: absolute path of the audio file. text: the transcript (None in untranscribed manifests).
    row: where it came from (line number of a JSON-lines file, first line of a CSV/TSV record, 1-based position of
    a directory's sorted audio files). start/end: seconds into the file (None: from the start / to the end).
    duration: seconds of audio, filled in by `check_audio`.
    """

    audio: str
    text: Optional[str]
    row: int
    language: Optional[str] = None
    start: Optional[float] = None
    end: Optional[float] = None
    prompt: Optional[str] = None
    duration: Optional[float] = None


@dataclass(frozen=True)
class Problem:
    """A row that was skipped, and why (one sentence)."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass
class Manifest:
    """The usable examples of a manifest and the rows that were skipped."""

    source: str
    examples: List[Example]
    problems: List[Problem] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source}: {len(self.examples)} usable rows"
        if self.problems:
            shown = "; ".join(str(p) for p in self.problems[:5])
            more = f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
            text += f", {len(self.problems)} skipped ({shown}{more})"
        return text


class _Rows:
    """Collects problems; raises on the first one under ``strict``."""

    def __init__(self, source: str, strict: bool):
        self.source = source
        self.strict = strict
        self.problems: List[Problem] = []

    def skip(self, row: int, reason: str) -> None:
        if self.strict:
            raise DataError(f"{self.source}, row {row}: {reason}")
        self.problems.append(Problem(row, reason))


def _has_undecodable_bytes(text: str) -> bool:
    # Text is decoded with surrogateescape: bytes that are not UTF-8 become lone surrogates U+DC80..U+DCFF.
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _optional_seconds(value: object, name: str) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a finite, non-negative number of seconds, got {value!r}")
    return seconds


def _optional_text(value: object, name: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value.strip() or None


def _example_from_record(record: Dict[str, object], row: int, folder: Path, require_text: bool) -> Example:
    """Build an Example from a parsed row; raises ValueError with the reason when the row is unusable."""
    audio = record.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError("has no 'audio' path")
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {type(text).__name__}")
    if require_text:
        if text is None:
            raise ValueError("has no 'text' column")
        if not text.strip():
            raise ValueError("has an empty transcript")
    start = _optional_seconds(record.get("start"), "start")
    end = _optional_seconds(record.get("end"), "end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end {end:g} s is not after start {start:g} s")
    path = Path(os.path.expanduser(audio.strip()))
    if not path.is_absolute():
        path = folder / path
    return Example(
        audio=str(path),
        text=text.strip() if isinstance(text, str) else None,
        row=row,
        language=_optional_text(record.get("language"), "language"),
        start=start,
        end=end,
        prompt=_optional_text(record.get("prompt"), "prompt"),
    )


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read manifest {str(path)!r}: {error.strerror}") from None
    # utf-8-sig drops a byte-order mark; surrogateescape keeps undecodable bytes so only their rows are rejected.
    return data.decode("utf-8-sig", errors="surrogateescape")


def _parse_jsonl(path: Path, rows: _Rows, require_text: bool) -> List[Example]:
    examples = []
    # Lines end at "\n" only: str.splitlines would also break inside rows whose text holds U+2028, U+0085, ...
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if _has_undecodable_bytes(line):
            rows.skip(number, "is not valid UTF-8")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            rows.skip(number, f"is not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            rows.skip(number, f"is a JSON {type(record).__name__}, expected an object with 'audio' and 'text'")
            continue
        try:
            examples.append(_example_from_record(record, number, path.parent, require_text))
        except ValueError as error:
            rows.skip(number, str(error))
    return examples


# Line ends as csv's reader counts them (io.StringIO with newline="" splits at each of these).
_CSV_LINE_END = re.compile(r"\r\n|\r|\n")


def _parse_delimited(path: Path, rows: _Rows, require_text: bool, delimiter: str) -> List[Example]:
    text = _read_text(path)
    line_starts = [0] + [match.end() for match in _CSV_LINE_END.finditer(text)]
    kind = "TSV" if delimiter == "\t" else "CSV"

    def reader_from(line: int):
        """A strict reader (malformed quoting is an error, not silently kept) from 0-based line ``line`` on."""
        return csv.reader(io.StringIO(text[line_starts[line] :], newline=""), delimiter=delimiter, strict=True)

    reader = reader_from(0)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as error:
        raise DataError(f"manifest {str(path)!r} has an unreadable header row ({error})") from None
    header = [name.strip() for name in header]
    required = ["audio"] + (["text"] if require_text else [])
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(
            f"manifest {str(path)!r} has no {', '.join(repr(m) for m in missing)} column in its header "
            f"(found {', '.join(repr(h) for h in header) or 'nothing'})"
        )
    examples = []
    offset, line_end = 0, reader.line_num  # lines before the reader's start; lines it has read
    while True:
        row = offset + line_end + 1  # the record's first line (quoted fields may span several lines)
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            # An unterminated quote would swallow every later line: report this record and read on from the line
            # after its first one.
            reason = "a quote that is never closed" if "unexpected end of data" in str(error) else str(error)
            rows.skip(row, f"is not valid {kind} ({reason})")
            if row >= len(line_starts):
                break
            offset, reader, line_end = row, reader_from(row), 0
            continue
        line_end = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if any(_has_undecodable_bytes(v) for v in values):
            rows.skip(row, "is not valid UTF-8")
            continue
        if len(values) != len(header):
            rows.skip(row, f"has {len(values)} fields, the header has {len(header)}")
            continue
        record = {name: value for name, value in zip(header, values)}
        try:
            examples.append(_example_from_record(record, row, path.parent, require_text))
        except ValueError as error:
            rows.skip(row, str(error))
    return examples


def _parse_directory(path: Path, rows: _Rows, require_text: bool) -> List[Example]:
    audio_files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    examples = []
    for number, audio in enumerate(audio_files, start=1):
        transcript = audio.with_suffix(".txt")
        text: Optional[str] = None
        if transcript.is_file():
            raw = transcript.read_bytes().decode("utf-8-sig", errors="surrogateescape")
            if _has_undecodable_bytes(raw):
                rows.skip(number, f"transcript {transcript.name!r} is not valid UTF-8")
                continue
            text = " ".join(raw.split())
        elif require_text:
            rows.skip(number, f"audio file {audio.name!r} has no transcript {transcript.name!r}")
            continue
        try:
            examples.append(_example_from_record({"audio": str(audio), "text": text}, number, path, require_text))
        except ValueError as error:
            rows.skip(number, f"{audio.name}: {error}")
    return examples


def read_manifest(source: PathLike, strict: bool = False, require_text: bool = True) -> Manifest:
    """Parse a manifest (JSONL/CSV/TSV) or a directory of audio files with ``.txt`` transcripts.

    Only the text is checked here; `check_audio` opens the audio files. Raises `DataError` when the source is
    missing, has an unknown suffix or a header without the required columns, or (under ``strict``) at the first
    bad row. An empty result is not an error here (see `load_examples`).
    """
    path = Path(os.fspath(source)).expanduser()
    label = os.fspath(source)
    rows = _Rows(label, strict)
    if path.is_dir():
        examples = _parse_directory(path, rows, require_text)
    elif not path.exists():
        raise DataError(f"manifest {label!r} does not exist")
    else:
        kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"manifest {label!r} has an unknown suffix {path.suffix!r}: expected .jsonl, .json, .csv or .tsv, "
                "or a directory of audio files with .txt transcripts"
            )
        if kind == "jsonl":
            examples = _parse_jsonl(path, rows, require_text)
        else:
            examples = _parse_delimited(path, rows, require_text, "," if kind == "csv" else "\t")
    return Manifest(label, examples, rows.problems)


def check_audio(manifest: Manifest, strict: bool = False) -> Manifest:
    """Open every example's audio header: drop missing or undecodable files, bad spans and clips over 30 s.

    Fills ``Example.duration`` (seconds of the clip, after ``start``/``end``). Returns a new Manifest.
    """
    rows = _Rows(manifest.source, strict)
    rows.problems = list(manifest.problems)
    examples = []
    for example in manifest.examples:
        try:
            length = audio_duration(example.audio)
        except AudioError as error:
            rows.skip(example.row, str(error))
            continue
        start = example.start or 0.0
        end = example.end if example.end is not None else length
        if start >= length:
            rows.skip(example.row, f"start {start:g} s is past the end of {example.audio!r} ({length:.2f} s)")
            continue
        if end > length + _END_TOLERANCE_S:
            rows.skip(example.row, f"end {end:g} s is past the end of {example.audio!r} ({length:.2f} s)")
            continue
        duration = min(end, length) - start
        if duration > MAX_CLIP_SECONDS:
            rows.skip(example.row, f"clip is {duration:.1f} s long; a Whisper window holds at most 30 s")
            continue
        if duration < MIN_CLIP_SECONDS:
            rows.skip(example.row, f"clip is {1000 * duration:.0f} ms long; at least 20 ms (two mel frames) are needed")
            continue
        examples.append(replace(example, duration=duration))
    rows.problems.sort(key=lambda p: p.row)
    return Manifest(manifest.source, examples, rows.problems)


def language_code(language: Optional[str]) -> Optional[str]:
    """A Whisper language code from a code or a name (``"German"`` -> ``"de"``); None stays None."""
    if language is None:
        return None
    code = language.strip().lower()
    code = TO_LANGUAGE_CODE.get(code, code)
    if code not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}: expected a Whisper language code (en, de, ...) or name")
    return code


@dataclass(frozen=True)
class TokenizerSpec:
    """What decides a model's tokenizer and SOT sequence."""

    multilingual: bool
    num_languages: int
    n_text_ctx: int
    task: str = "transcribe"
    default_language: Optional[str] = None

    @classmethod
    def for_model(cls, model, task: str = "transcribe", language: Optional[str] = None) -> "TokenizerSpec":
        return cls(model.is_multilingual, model.num_languages, model.dims.n_text_ctx, task, language_code(language))

    def language_of(self, example: Example) -> str:
        """The example's language code (``en`` for English-only models); ValueError when unusable."""
        code = language_code(example.language) or self.default_language
        if not self.multilingual:
            if code not in (None, "en"):
                raise ValueError(f"language {code!r} given, but the model is English-only")
            return "en"
        return code or "en"

    def tokenizer(self, language: str) -> Tokenizer:
        if self.multilingual:
            return get_tokenizer(True, num_languages=self.num_languages, language=language, task=self.task)
        return get_tokenizer(False)


def prompt_tokens(tokenizer: Tokenizer, prompt: Optional[str], n_text_ctx: int) -> List[int]:
    """``<|startofprev|>`` and the prompt's last tokens, as upstream decoding lays out a prompt (no loss on them)."""
    if not prompt:
        return []
    tokens = tokenizer.encode(" " + prompt.strip())
    return [tokenizer.sot_prev] + tokens[-(n_text_ctx // 2 - 1) :]


def target_sequence(
    tokenizer: Tokenizer, text_tokens: Sequence[int], prompt: Sequence[int] = ()
) -> Tuple[List[int], List[int]]:
    """Decoder input and labels for one utterance, without timestamps.

    Sequence: ``prompt + SOT sequence (sot, language, task, no-timestamps) + text + EOT``. The decoder reads every
    token but the last; position ``i`` is trained to predict token ``i + 1`` only where that token is text or EOT
    (other labels are `IGNORE_INDEX`). Returns (tokens, labels), both of length ``len(sequence) - 1``.
    """
    head = list(prompt) + list(tokenizer.sot_sequence_including_notimestamps)
    sequence = head + list(text_tokens) + [tokenizer.eot]
    tokens = sequence[:-1]
    labels = [token if i + 1 >= len(head) else IGNORE_INDEX for i, token in enumerate(sequence[1:])]
    return tokens, labels


@dataclass
class Item:
    """One decoded example, as a worker returns it."""

    index: int
    mel: Tensor  # (n_mels, n_frames)
    frames: int  # real (unpadded) frames
    tokens: Optional[Tensor]  # (n_tokens,) or None without a transcript
    labels: Optional[Tensor]
    seconds: float
    teacher_mel: Optional[Tensor] = None  # (n_mels, 3000), only when it differs from ``mel``
    replaced_row: Optional[int] = None  # the row whose audio failed to decode and was replaced by this one


class SpeechDataset(torch.utils.data.Dataset):
    """Examples with their target tokens; ``dataset[i]`` decodes the audio and computes the log-mel.

    pad_30s: give each clip as upstream's 30-s window (3000 frames) instead of its own frames.
    teacher_30s: also return the 30-s window (for a distillation teacher) when ``mel`` is unpadded.
    """

    def __init__(
        self,
        manifest: Manifest,
        spec: TokenizerSpec,
        n_mels: int,
        pad_30s: bool,
        teacher_30s: bool = False,
        strict: bool = False,
        require_text: bool = True,
    ):
        self.source = manifest.source
        self.spec = spec
        self.n_mels = n_mels
        self.pad_30s = pad_30s
        self.teacher_30s = teacher_30s
        self.strict = strict
        self.require_text = require_text
        rows = _Rows(manifest.source, strict)
        rows.problems = list(manifest.problems)
        self.examples: List[Example] = []
        self.languages: List[str] = []
        self.prompts: List[List[int]] = []
        self.targets: List[Optional[Tuple[List[int], List[int]]]] = []
        for example in manifest.examples:
            try:
                language = spec.language_of(example)
            except ValueError as error:
                rows.skip(example.row, str(error))
                continue
            tokenizer = spec.tokenizer(language)
            prompt = prompt_tokens(tokenizer, example.prompt, spec.n_text_ctx)
            target = None
            if example.text is not None and require_text:
                target = target_sequence(tokenizer, tokenizer.encode(" " + example.text), prompt)
                if len(target[0]) > spec.n_text_ctx:
                    rows.skip(
                        example.row,
                        f"has {len(target[0])} decoder input tokens; the model's text context holds {spec.n_text_ctx}",
                    )
                    continue
            self.examples.append(example)
            self.languages.append(language)
            self.prompts.append(prompt)
            self.targets.append(target)
        rows.problems.sort(key=lambda p: p.row)
        self.problems = rows.problems

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def durations(self) -> List[float]:
        return [float(e.duration or 0.0) for e in self.examples]

    def tokenizer(self, index: int) -> Tokenizer:
        return self.spec.tokenizer(self.languages[index])

    def _audio(self, example: Example) -> np.ndarray:
        return load_audio(example.audio, start=example.start, end=example.end)

    def __getitem__(self, index: int) -> Item:
        # Audio that passed the header check can still fail to decode (a truncated file); outside strict mode the
        # next example stands in, so batches keep their size (every DDP rank needs a non-empty batch).
        for attempt in range(len(self.examples)):
            candidate = (index + attempt) % len(self.examples)
            try:
                audio = self._audio(self.examples[candidate])
            except AudioError as error:
                if self.strict:
                    raise DataError(f"{self.source}, row {self.examples[candidate].row}: {error}") from None
                logger.warning("%s, row %d: %s", self.source, self.examples[candidate].row, error)
                continue
            item = self._item(candidate, audio)
            if attempt:
                item.replaced_row = self.examples[index].row
            return item
        raise DataError(f"{self.source}: no audio file of the manifest could be decoded")

    def _item(self, index: int, audio: np.ndarray) -> Item:
        audio = audio[:N_SAMPLES]
        if len(audio) < 2 * HOP_LENGTH:  # shorter than its header said: pad to the two frames every clip has
            audio = np.pad(audio, (0, 2 * HOP_LENGTH - len(audio)))
        window = None
        if self.pad_30s or self.teacher_30s:
            # Upstream pads the *audio* with silence before the log-mel, so padding frames sit at the spectrogram's
            # floor, as in every 30-s window the pretrained model has seen.
            window = log_mel_spectrogram(pad_or_trim(audio), n_mels=self.n_mels)
        if self.pad_30s:
            mel, frames = window, min(len(audio) // HOP_LENGTH, N_FRAMES)
        else:
            mel, frames = unpadded_features(audio, self.n_mels)
        target = self.targets[index]
        return Item(
            index=index,
            mel=mel,
            frames=frames,
            tokens=torch.tensor(target[0]) if target else None,
            labels=torch.tensor(target[1]) if target else None,
            seconds=len(audio) / SAMPLE_RATE,
            teacher_mel=window if (self.teacher_30s and not self.pad_30s) else None,
        )


def unpadded_features(audio: np.ndarray, n_mels: int) -> Tuple[Tensor, int]:
    """A clip's log-mel as unpadded transcription feeds it: (n_mels, frames) and frames.

    Transcription pads the audio with silence and cuts the mel where `real_frame_counts` finds the padding, so a
    clip's own trailing digital silence (often 0.3-0.5 s in TTS output) is dropped with it: it cannot be told apart
    from the padding. Training must cut the same way; a model trained on clips with that silence misreads clips
    that arrive without it (measured on a transplanted tiny.en: 114 % WER cut at the speech, 37 % with 1 s of
    silence left). One second of padding gives the same frames as the 30-s window at a tenth of its cost.
    """
    padded = pad_or_trim(audio, min(len(audio) + SAMPLE_RATE, N_SAMPLES))
    mel = log_mel_spectrogram(padded, n_mels=n_mels)
    frames = int(real_frame_counts(mel))
    return mel[:, :frames], frames


def load_examples(
    source: PathLike,
    model,
    *,
    pad_30s: bool,
    strict: bool = False,
    require_text: bool = True,
    teacher_30s: bool = False,
    language: Optional[str] = None,
    task: str = "transcribe",
) -> SpeechDataset:
    """Read, check and tokenise a manifest for ``model``; log what was skipped.

    Raises `DataError` naming the file when nothing usable is left.
    """
    manifest = read_manifest(source, strict=strict, require_text=require_text)
    if not manifest.examples and not manifest.problems:
        raise DataError(f"manifest {manifest.source!r} is empty: it lists no audio")
    manifest = check_audio(manifest, strict=strict)
    spec = TokenizerSpec.for_model(model, task=task, language=language)
    dataset = SpeechDataset(manifest, spec, model.dims.n_mels, pad_30s, teacher_30s, strict, require_text)
    if dataset.problems:
        logger.warning("%s", Manifest(manifest.source, dataset.examples, dataset.problems).summary())
    if not len(dataset):
        shown = "; ".join(str(p) for p in dataset.problems[:3])
        raise DataError(f"manifest {manifest.source!r} has no usable rows ({len(dataset.problems)} skipped: {shown})")
    return dataset


@dataclass
class Batch:
    """Collated items. ``mel`` is (b, n_mels, n_frames): 3000 frames when padded to 30 s, else the longest clip
    rounded up to an even count with zeros after each clip's ``frames``."""

    indices: List[int]
    mel: Tensor
    frames: Tensor  # (b,) real frames per clip
    padded_30s: bool
    tokens: Optional[Tensor]  # (b, n_tokens), EOT after each sequence
    labels: Optional[Tensor]  # (b, n_tokens), IGNORE_INDEX after each sequence
    seconds: List[float]
    teacher_mel: Optional[Tensor] = None
    replaced_rows: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_frames(self) -> Optional[Tensor]:
        """What to pass as ``model(mel, tokens, n_frames)``: the real frame counts, or None for 30-s windows."""
        return None if self.padded_30s else self.frames

    def to(self, device: "torch.device | str") -> "Batch":
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(
            self, mel=move(self.mel), frames=move(self.frames), tokens=move(self.tokens), labels=move(self.labels),
            teacher_mel=move(self.teacher_mel),
        )  # fmt: skip


def pad_token_rows(rows: Sequence[Sequence[int]], fill: int) -> Tensor:
    """Right-pad integer rows to the longest: (b, n)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class Collator:
    """Stacks Items into a Batch (picklable, for DataLoader workers)."""

    def __init__(self, eot: int, padded_30s: bool):
        self.eot = eot
        self.padded_30s = padded_30s

    def __call__(self, items: Sequence[Item]) -> Batch:
        if self.padded_30s:
            mel = torch.stack([item.mel for item in items])
        else:
            width = max(item.mel.shape[-1] for item in items)
            width += width % 2  # the stride-2 conv then reads no frame past the batch
            mel = torch.zeros(len(items), items[0].mel.shape[0], width)
            for i, item in enumerate(items):
                mel[i, :, : item.mel.shape[-1]] = item.mel
        tokens = labels = None
        if items[0].tokens is not None:
            tokens = pad_token_rows([item.tokens.tolist() for item in items], self.eot)
            labels = pad_token_rows([item.labels.tolist() for item in items], IGNORE_INDEX)
        teacher = None
        if items[0].teacher_mel is not None:
            teacher = torch.stack([item.teacher_mel for item in items])
        return Batch(
            indices=[item.index for item in items],
            mel=mel,
            frames=torch.tensor([item.frames for item in items], dtype=torch.long),
            padded_30s=self.padded_30s,
            tokens=tokens,
            labels=labels,
            seconds=[item.seconds for item in items],
            teacher_mel=teacher,
            replaced_rows=[item.replaced_row for item in items if item.replaced_row is not None],
        )


class BucketBatchSampler(torch.utils.data.Sampler):
    """An endless, seeded sequence of global batches, sliced per rank; its position can be saved and restored.

    Epoch ``e`` shuffles the examples with a generator seeded by ``(seed, e)``, drops the remainder that does not
    fill a batch, and (with ``bucket``) sorts windows of ``bucket_batches`` batches by duration before cutting them
    into batches, whose order is shuffled again: clips of a batch have similar lengths, so unpadded batches carry
    little padding. Batch ``p`` of the whole run is thus a pure function of (seed, p): resuming at position ``p``
    reproduces the remaining batches exactly, whatever the number of DataLoader workers or ranks.

    Each global batch holds ``batch_size`` examples; rank ``r`` of ``world_size`` gets items ``r::world_size``.
    """

    def __init__(
        self,
        durations: Sequence[float],
        batch_size: int,
        seed: int = 0,
        bucket: bool = True,
        rank: int = 0,
        world_size: int = 1,
        bucket_batches: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes ({world_size})")
        if len(durations) < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {len(durations)} usable training examples"
            )
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket = bucket
        self.rank = rank
        self.world_size = world_size
        self.bucket_batches = bucket_batches
        self.position = 0
        self._cache: Tuple[int, List[List[int]]] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        return len(self.durations) // self.batch_size

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The global batches of an epoch (lists of dataset indices)."""
        if self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.durations))[: self.batches_per_epoch * self.batch_size]
        if self.bucket:
            window = self.batch_size * self.bucket_batches
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([c[np.argsort(self.durations[c], kind="stable")] for c in chunks])
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def global_batch(self, position: int) -> List[int]:
        epoch, index = divmod(position, self.batches_per_epoch)
        return self.epoch_batches(epoch)[index]

    def __iter__(self) -> Iterator[List[int]]:
        position = self.position
        while True:
            yield self.global_batch(position)[self.rank :: self.world_size]
            position += 1

    def state_dict(self) -> Dict[str, int]:
        return {"position": int(self.position), "seed": int(self.seed), "batch_size": int(self.batch_size),
                "n_examples": int(len(self.durations))}  # fmt: skip

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("seed", "batch_size", "n_examples"):
            mine = self.state_dict()[key]
            if int(state[key]) != mine:
                raise ValueError(
                    f"cannot restore the sampler position: it was saved with {key}={state[key]}, this run has {mine} "
                    "(resume needs the same training data, batch_size and seed)"
                )
        self.position = int(state["position"])


def eval_batches(dataset: SpeechDataset, batch_size: int) -> List[List[int]]:
    """Every example once, sorted by duration (little padding), in batches of at most ``batch_size``."""
    order = np.argsort(np.asarray(dataset.durations), kind="stable").tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _worker_init(_: int) -> None:
    # Each worker computes one clip's log-mel at a time; several threads per worker would oversubscribe the CPU.
    torch.set_num_threads(1)


def make_loader(
    dataset: SpeechDataset,
    batch_sampler: "torch.utils.data.Sampler | List[List[int]]",
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader that decodes and featurises in ``num_workers`` processes (0: in this process)."""
    eot = dataset.tokenizer(0).eot if len(dataset) else 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=Collator(eot, dataset.pad_30s),
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=num_workers > 0,
    )


def spec_augment_(
    mel: Tensor,
    frames: Tensor,
    generator: torch.Generator,
    freq_masks: int = 2,
    freq_width: int = 27,
    time_masks: int = 2,
    time_width: int = 40,
    max_time_fraction: float = 0.1,
) -> Tensor:
    """SpecAugment masking in place: ``freq_masks`` bands of up to ``freq_width`` mel bins and ``time_masks`` spans
    of up to ``time_width`` frames (and at most ``max_time_fraction`` of the clip), set to zero.

    mel: (n_mels, n_frames); frames: real frames (masks stay inside the audio). Returns ``mel``.
    """
    n_mels = mel.shape[0]
    n_real = int(frames)

    def draw(high: int) -> int:
        return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator))

    for _ in range(freq_masks):
        width = draw(min(freq_width, n_mels))
        first = draw(n_mels - width)
        mel[first : first + width, :n_real] = 0
    limit = min(time_width, int(max_time_fraction * n_real))
    for _ in range(time_masks):
        width = draw(limit)
        first = draw(n_real - width)
        mel[:, first : first + width] = 0
    return mel
