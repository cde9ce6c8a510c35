"""Manifests: which clips, with which transcripts, languages, spans and prompts.

A manifest lists one utterance per row with the fields ``audio`` (a path, relative paths resolved against the
manifest's folder), ``text``, and optionally ``language``, ``start``/``end`` (seconds into the file) and ``prompt``
(previous-context text, given to the decoder after ``<|startofprev|>`` and never trained on). Formats: JSON lines
(``.jsonl``/``.json``), ``.csv`` and ``.tsv`` with a header row, or a directory of audio files each with a
same-named ``.txt`` transcript.

Rows that cannot be used (malformed lines, missing columns, URLs, missing or undecodable audio, empty transcripts,
transcripts longer than their clip can hold, clips over 30 s) are skipped and listed with their row numbers; with
``strict`` the first one is an error.
"""

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

from whisper.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from ..audio import audio_duration
from ..errors import AudioError, DataError, PathLike
from ..fs.files import read_regular, user_path

__all__ = ["DataError", "Example", "Manifest", "Problem", "check_audio", "language_code", "read_manifest"]

#: Longest clip a Whisper window holds, in seconds.
MAX_CLIP_SECONDS = N_SAMPLES / SAMPLE_RATE
#: Shortest clip that yields two mel frames (one encoder position).
MIN_CLIP_SECONDS = 2 * HOP_LENGTH / SAMPLE_RATE
#: File suffixes read as audio when a directory is given instead of a manifest.
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac", ".wma")
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
#: A transcript (or prompt) holds at most this many characters per second of its clip, plus `TEXT_SLACK`: several
#: times the fastest speech (about 30 a second), so that only text no clip can hold is refused, before it is tokenized
#: (which costs about 90 times its size in memory).
TEXT_PER_SECOND = 200
TEXT_SLACK = 200
# "scheme://": a URL, which the audio readers do not fetch.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A clip's span may run this far past the file's end (rounded segment times) before the row is rejected.
_END_TOLERANCE_S = 0.05


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


class RowProblems:
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


def text_limit(seconds: Optional[float] = None) -> int:
    """The most characters the transcript of a clip of ``seconds`` may hold (`TEXT_PER_SECOND` a second plus
    `TEXT_SLACK`); a clip of unknown length counts as the longest a window holds (30 s: 6200 characters)."""
    seconds = MAX_CLIP_SECONDS if seconds is None else min(seconds, MAX_CLIP_SECONDS)
    return int(TEXT_PER_SECOND * seconds) + TEXT_SLACK


def check_text_length(text: Optional[str], name: str, seconds: Optional[float] = None) -> None:
    """Raise ValueError when ``text`` (a row's field ``name``) is longer than a clip of ``seconds`` can hold."""
    limit = text_limit(seconds)
    if text is not None and len(text) > limit:
        clip = f"a {seconds:.2f} s clip" if seconds is not None else "a clip of at most 30 s"
        raise ValueError(
            f"'{name}' holds {len(text)} characters; {clip} holds at most {limit} "
            f"({TEXT_PER_SECOND} a second + {TEXT_SLACK})"
        )


def _span_seconds(start: Optional[float], end: Optional[float]) -> Optional[float]:
    """The length of a row's span when its end is given (from ``start``, or the file's start), else None."""
    return None if end is None else end - (start or 0.0)


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
    if _URL.match(audio.strip()):
        raise ValueError(f"'audio' is a URL ({audio.strip()}), which is not supported: give a local file's path")
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
    text = text.strip() if isinstance(text, str) else None
    check_text_length(text, "text", _span_seconds(start, end))
    prompt = _optional_text(record.get("prompt"), "prompt")
    check_text_length(prompt, "prompt")  # the text before the clip, not the clip's own: the longest clip's cap
    path = user_path(audio.strip())
    if not path.is_absolute():
        path = folder / path
    return Example(
        audio=str(path),
        text=text,
        row=row,
        language=_optional_text(record.get("language"), "language"),
        start=start,
        end=end,
        prompt=prompt,
    )


def _read_text(path: Path) -> str:
    # A regular file only: a FIFO would block the reader forever, a device could feed it without end.
    data = read_regular(path, "manifest", DataError)
    # utf-8-sig drops a byte-order mark; surrogateescape keeps undecodable bytes so only their rows are rejected.
    return data.decode("utf-8-sig", errors="surrogateescape")


def _parse_jsonl(path: Path, rows: RowProblems, require_text: bool) -> List[Example]:
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


def _parse_delimited(path: Path, rows: RowProblems, require_text: bool, delimiter: str) -> List[Example]:
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


def _parse_directory(path: Path, rows: RowProblems, require_text: bool) -> List[Example]:
    audio_files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    examples = []
    for number, audio in enumerate(audio_files, start=1):
        transcript = audio.with_suffix(".txt")
        text: Optional[str] = None
        if transcript.is_file():
            try:  # read only what a transcript can be: UTF-8 takes at most 4 bytes a character
                data = read_regular(transcript, "transcript", DataError, limit=4 * text_limit())
            except DataError as error:
                rows.skip(number, str(error))
                continue
            raw = data.decode("utf-8-sig", errors="surrogateescape")
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
    # Absolute from here on: every row's audio path is joined to this folder once, whether the manifest or folder
    # was named relative to the working directory or with ~ (which no shell expands in a config file).
    path = Path(os.path.abspath(user_path(source)))
    label = os.fspath(source)
    rows = RowProblems(label, strict)
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


def check_audio(manifest: Manifest, strict: bool = False, max_seconds: Optional[float] = MAX_CLIP_SECONDS) -> Manifest:
    """Open every example's audio header: drop missing or undecodable files, bad spans and clips over
    ``max_seconds`` (a 30-s Whisper window; None keeps long recordings, which `windows` cuts into windows and
    `evaluate` transcribes window by window).

    Fills ``Example.duration`` (seconds of the clip, after ``start``/``end``). Returns a new Manifest.
    """
    rows = RowProblems(manifest.source, strict)
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
        if max_seconds is not None and duration > max_seconds:
            rows.skip(example.row, f"clip is {duration:.1f} s long; a Whisper window holds at most 30 s")
            continue
        try:
            check_text_length(example.text, "text", duration)
        except ValueError as error:
            rows.skip(example.row, str(error))
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
