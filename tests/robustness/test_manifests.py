"""Manifests with every kind of bad row, generated: the documented outcome for each, and exact accounting.

whisper_rope.data documents: rows that cannot be used are skipped and listed with their row numbers (the line of a
JSON-lines row, the first line of a CSV record); under ``strict`` the first one is a `DataError` naming the file and
the row. Blank lines are not rows. Relative audio paths resolve against the manifest's folder, whatever the
working directory. Duplicate rows are not documented: they are kept, each one an example (pinned here).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisper_rope import build_model
from whisper_rope.data import DataError, check_audio, load_examples, read_manifest

from ..conftest import small_dims
from . import LONG, SPEECH, PeakMemory, assert_clear_message, scaled, time_limit
from .commands import HELLO, SPEECH_DIMS, mib, peak_memory, save_model, write_manifest

CLIPS = sorted(p.name for p in SPEECH.glob("*.flac"))[:3]
MANIFEST_SETTINGS = settings(
    max_examples=scaled(150, 2000),
    deadline=None,
    database=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Transcripts: any text but lone surrogates, NUL and carriage returns (a bare \r ends a CSV line, so the generator
# below could not number the records by counting \n); Unicode line separators (U+2028, U+0085 ...) included.
TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), min_size=1, max_size=30
).filter(str.strip)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``data/`` holds the manifests, ``data/clips/`` three fixture clips referenced relatively."""
    root = tmp_path_factory.mktemp("manifests") / "data"
    (root / "clips").mkdir(parents=True)
    for name in CLIPS:
        shutil.copy(SPEECH / name, root / "clips" / name)
    (root.parent / "elsewhere").mkdir()
    return root


@dataclass
class Row:
    """One generated line or record and what the reader must make of it."""

    kind: str
    lines: int  # physical lines it takes
    usable_text: bool  # read_manifest keeps it
    usable_audio: bool = True  # check_audio keeps it too (when usable_text)


# ----------------------------------------------------------------------------------------------------------------
# JSON lines

JSONL_BAD = {
    "malformed JSON": st.sampled_from(
        ['{"audio": "clips/a.flac", "text": ', "{not json}", '{"audio": }', "[1, 2", '"unterminated']
    ),
    "not an object": st.sampled_from(["[1, 2]", "42", '"a string"', "null", "true"]),
    "no audio": TEXT.map(lambda t: json.dumps({"text": t})),
    "audio not a string": TEXT.map(lambda t: json.dumps({"audio": 7, "text": t})),
    "no text": st.just(json.dumps({"audio": "clips/x.flac"})),
    "empty text": st.sampled_from(["", "   ", "\t"]).map(lambda t: json.dumps({"audio": "clips/x.flac", "text": t})),
    "text not a string": st.sampled_from([5, 1.5, ["a"], {"b": 1}]).map(
        lambda t: json.dumps({"audio": "clips/x.flac", "text": t})
    ),
    "bad span": st.sampled_from([(2, 1), (-1, None), ("soon", None), (None, float("inf")), (1, 1)]).map(
        lambda s: json.dumps({"audio": "clips/x.flac", "text": "t", "start": s[0], "end": s[1]})
    ),
}


@st.composite
def jsonl_manifests(draw) -> Tuple[bytes, List[Row]]:
    lines: List[bytes] = []
    rows: List[Row] = []
    good_lines: List[bytes] = []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(
            st.sampled_from(["good", "good", "good", "duplicate", "blank", "non-UTF-8", "missing audio", *JSONL_BAD])
        )
        if kind == "duplicate" and not good_lines:
            kind = "good"
        if kind == "good":
            record = {"audio": f"clips/{draw(st.sampled_from(CLIPS))}", "text": draw(TEXT)}
            if draw(st.booleans()):
                record.update(start=0.5, end=1.5)
            line = json.dumps(record, ensure_ascii=draw(st.booleans())).encode()
            good_lines.append(line)
            rows.append(Row(kind, 1, True))
        elif kind == "duplicate":
            line = draw(st.sampled_from(good_lines))
            rows.append(Row(kind, 1, True))
        elif kind == "blank":
            line = draw(st.sampled_from([b"", b"   ", b"\t"]))
            rows.append(Row(kind, 1, False))
        elif kind == "non-UTF-8":
            line = json.dumps({"audio": f"clips/{CLIPS[0]}", "text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
            rows.append(Row(kind, 1, False))
        elif kind == "missing audio":
            line = json.dumps({"audio": "clips/absent.flac", "text": draw(TEXT)}).encode()
            rows.append(Row(kind, 1, True, usable_audio=False))
        else:
            line = draw(JSONL_BAD[kind]).encode()
            rows.append(Row(kind, 1, False))
        lines.append(line)
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = ending.join(lines) + (ending if lines and draw(st.booleans()) else b"")
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body  # a byte-order mark, as some editors write
    return body, rows


def _numbered(rows: List[Row]) -> List[Tuple[int, Row]]:
    numbered, line = [], 1
    for row in rows:
        numbered.append((line, row))
        line += row.lines
    return numbered


def _check_accounting(path: Path, rows: List[Row]) -> None:
    """Non-strict and strict reading of ``path`` against what ``rows`` says, from another working directory."""
    numbered = [(n, r) for n, r in _numbered(rows) if r.kind != "blank"]
    kept = [n for n, r in numbered if r.usable_text]
    skipped = [n for n, r in numbered if not r.usable_text]
    no_audio = [n for n, r in numbered if r.usable_text and not r.usable_audio]
    previous = os.getcwd()
    os.chdir(path.parent.parent / "elsewhere")  # relative audio paths must not depend on the working directory
    try:
        parsed = read_manifest(path)
        assert [e.row for e in parsed.examples] == kept
        assert [p.row for p in parsed.problems] == skipped
        for problem in parsed.problems:
            assert problem.reason.strip() and "\n" not in problem.reason, problem
        summary = parsed.summary()
        assert f"{len(kept)} usable rows" in summary
        if skipped:
            assert f"{len(skipped)} skipped" in summary
            assert all(f"row {n}:" in summary for n in skipped[:5])
        checked = check_audio(parsed)
        assert [e.row for e in checked.examples] == [n for n in kept if n not in no_audio]
        assert [p.row for p in checked.problems] == sorted(skipped + no_audio)
        assert all(Path(e.audio).is_absolute() and Path(e.audio).is_file() for e in checked.examples)

        first_bad = min(skipped + no_audio, default=None)
        if skipped:
            with pytest.raises(DataError) as strict:
                read_manifest(path, strict=True)
            message = assert_clear_message(strict.value)
            assert f"{path.name}, row {skipped[0]}: " in message, message
        else:
            strict_parsed = read_manifest(path, strict=True)
            if no_audio:
                with pytest.raises(DataError, match=rf"row {first_bad}: audio file "):
                    check_audio(strict_parsed, strict=True)
            else:
                assert [e.row for e in check_audio(strict_parsed, strict=True).examples] == kept
    finally:
        os.chdir(previous)


@MANIFEST_SETTINGS
@given(manifest=jsonl_manifests())
def test_generated_jsonl_manifests_keep_good_rows_and_list_every_bad_one_by_line(folder, manifest):
    body, rows = manifest
    path = folder / "generated.jsonl"
    path.write_bytes(body)
    _check_accounting(path, rows)


# ----------------------------------------------------------------------------------------------------------------
# CSV


def _csv_record(values: List[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue()


@st.composite
def csv_manifests(draw) -> Tuple[bytes, List[Row]]:
    header = "audio,text,start,end\n"
    records: List[str] = []
    rows: List[Row] = [Row("header", 1, False)]
    good: List[str] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(
            st.sampled_from(
                [
                    "good",
                    "good",
                    "good",
                    "quoted newlines",
                    "duplicate",
                    "blank",
                    "missing fields",
                    "extra fields",
                    "empty text",
                    "bad span",
                    "non-UTF-8",
                    "missing audio",
                ]
            )
        )
        if kind == "duplicate" and not good:
            kind = "good"
        clip = f"clips/{draw(st.sampled_from(CLIPS))}"
        usable, audio_ok = True, True
        if kind == "good":
            record = _csv_record([clip, draw(TEXT), "", ""])
            good.append(record)
        elif kind == "quoted newlines":
            record = _csv_record([clip, f'{draw(TEXT)}\n{draw(TEXT)},"{draw(TEXT)}"', "0.5", "1.5"])
            good.append(record)
        elif kind == "duplicate":
            record = draw(st.sampled_from(good))
        elif kind == "blank":
            record, usable = draw(st.sampled_from(["\n", ",,,\n", "  \n"])), False
        elif kind == "missing fields":
            record, usable = _csv_record([clip, draw(TEXT)]), False
        elif kind == "extra fields":
            record, usable = _csv_record([clip, draw(TEXT), "", "", "surplus"]), False
        elif kind == "empty text":
            record, usable = _csv_record([clip, draw(st.sampled_from(["", "   "])), "", ""]), False
        elif kind == "bad span":
            record, usable = (
                _csv_record([clip, "t", *draw(st.sampled_from([("2", "1"), ("-1", ""), ("x", "")]))]),
                False,
            )
        elif kind == "non-UTF-8":
            record, usable = "\udce9", False  # stands for a latin-1 byte, substituted when encoding below
        else:
            record, audio_ok = _csv_record(["clips/absent.flac", draw(TEXT), "", ""]), False
        records.append(record)
        rows.append(
            Row("blank" if kind == "blank" else kind, record.count("\n") if record != "\udce9" else 1, usable, audio_ok)
        )
    text = header + "".join(r if r != "\udce9" else f"{CLIPS[0]},caf\udce9\n" for r in records)
    return text.encode("utf-8", errors="surrogateescape"), rows


@MANIFEST_SETTINGS
@given(manifest=csv_manifests())
def test_generated_csv_manifests_keep_good_rows_and_list_every_bad_one_by_first_line(folder, manifest):
    body, rows = manifest
    path = folder / "generated.csv"
    path.write_bytes(body)
    _check_accounting(path, [Row("blank", 1, False)] + rows[1:])  # the header line numbers like a blank line


def test_a_csv_header_without_a_required_column_is_an_error_naming_the_file(folder):
    path = folder / "no-text.csv"
    path.write_text(f"audio,transcript\nclips/{CLIPS[0]},hello\n")
    with pytest.raises(DataError, match=r"no-text\.csv' has no 'text' column in its header"):
        read_manifest(path)


def test_duplicate_rows_are_kept_as_separate_examples(folder):
    line = json.dumps({"audio": f"clips/{CLIPS[0]}", "text": "same"})
    path = folder / "duplicates.jsonl"
    path.write_text(f"{line}\n{line}\n{line}\n")
    parsed = check_audio(read_manifest(path))
    assert [e.row for e in parsed.examples] == [1, 2, 3] and not parsed.problems


def test_load_examples_logs_the_skipped_count_and_row_numbers(folder, caplog):
    good = json.dumps({"audio": f"clips/{CLIPS[0]}", "text": "A short clip."})
    lines = [
        good,
        "{broken",
        json.dumps({"audio": f"clips/{CLIPS[1]}", "text": ""}),
        good,
        json.dumps({"audio": "clips/absent.flac", "text": "gone"}),
    ]
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        dataset = load_examples(path, build_model(small_dims(), "rotary"), pad_30s=False)
    assert [e.row for e in dataset.examples] == [1, 4]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "2 usable rows, 3 skipped (row 2: " in logged and "row 3: has an empty transcript" in logged
    assert "row 5: audio file" in logged


def test_jsonl_rows_with_unicode_line_separators_in_their_text_are_kept_and_numbered_by_line(folder):
    texts = ["first", "line\u2028separator", "next\x85line", "last"]
    path = folder / "separators.jsonl"
    path.write_text(
        "\n".join(json.dumps({"audio": f"clips/{CLIPS[0]}", "text": t}, ensure_ascii=False) for t in texts) + "\n",
        encoding="utf-8",
    )
    parsed = read_manifest(path)
    assert [(e.row, e.text) for e in parsed.examples] == list(enumerate(texts, start=1)) and not parsed.problems


def test_an_unterminated_csv_quote_is_reported_not_merged_into_a_transcript(folder):
    path = folder / "unterminated.csv"
    path.write_text(
        f'audio,text\nclips/{CLIPS[0]},one\nclips/{CLIPS[1]},"oops\nclips/{CLIPS[2]},three\nclips/{CLIPS[0]},four\n'
    )
    parsed = read_manifest(path)
    assert all("\n" not in e.text for e in parsed.examples), [e.text for e in parsed.examples]
    assert 3 in [p.row for p in parsed.problems]


# ----------------------------------------------------------------------------------------------------------------
# URLs, and transcripts no clip can hold


@pytest.mark.parametrize("url", ["https://example.com/x.flac", "s3://bucket/clip.wav", "file:///tmp/x.flac"])
def test_a_url_in_a_manifest_is_reported_as_an_unsupported_url(folder, url):
    path = folder / "urls.jsonl"
    path.write_text(
        json.dumps({"audio": f"clips/{CLIPS[0]}", "text": "kept"})
        + "\n"
        + json.dumps({"audio": url, "text": "hi"})
        + "\n"
    )
    parsed = check_audio(read_manifest(path))
    assert [e.row for e in parsed.examples] == [1]
    (problem,) = parsed.problems
    assert problem.row == 2 and "URL" in problem.reason and url in problem.reason, problem
    assert "does not exist" not in problem.reason and "not supported" in problem.reason, problem


#: The longest transcript a clip of at most 30 s may have: 200 characters per second of audio plus 200.
LONGEST_TEXT = 200 * 30 + 200


@pytest.mark.parametrize("field", ["text", "prompt"])
def test_a_transcript_longer_than_any_clip_can_hold_is_refused_naming_the_row_and_the_cap(folder, field):
    rows = [{"audio": f"clips/{CLIPS[0]}", "text": "kept", field: "x" * LONGEST_TEXT},
            {"audio": f"clips/{CLIPS[0]}", "text": "refused", field: "x" * (LONGEST_TEXT + 1)}]  # fmt: skip
    path = folder / f"long-{field}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parsed = read_manifest(path)
    assert [e.row for e in parsed.examples] == [1]
    (problem,) = parsed.problems
    assert problem.row == 2 and f"'{field}'" in problem.reason and str(LONGEST_TEXT) in problem.reason, problem
    with pytest.raises(DataError, match=rf"row 2: '{field}' holds {LONGEST_TEXT + 1} characters"):
        read_manifest(path, strict=True)


def test_a_transcript_longer_than_its_own_clip_can_hold_is_refused(folder):
    """The cap follows the clip: a span's (``start``/``end``) when the row gives one, the file's once it is opened."""
    from whisper_rope.audio import audio_duration

    seconds = audio_duration(folder / "clips" / CLIPS[0])
    cap = int(200 * seconds) + 200
    rows = [{"audio": f"clips/{CLIPS[0]}", "text": "y" * cap},
            {"audio": f"clips/{CLIPS[0]}", "text": "y" * (cap + 1)},
            {"audio": f"clips/{CLIPS[0]}", "text": "z" * 401, "start": 0.5, "end": 1.5},
            {"audio": f"clips/{CLIPS[0]}", "text": "z" * 400, "start": 0.5, "end": 1.5}]  # fmt: skip
    path = folder / "clip-length.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parsed = read_manifest(path)
    assert [p.row for p in parsed.problems] == [3] and "400" in parsed.problems[0].reason, parsed.problems
    checked = check_audio(parsed)
    assert [e.row for e in checked.examples] == [1, 4]
    assert [p.row for p in checked.problems] == [2, 3]
    assert str(cap) in checked.problems[0].reason and f"{seconds:.2f} s" in checked.problems[0].reason, checked


def test_a_huge_transcript_file_in_a_folder_is_refused_without_being_read(tmp_path):
    shutil.copy(SPEECH / CLIPS[0], tmp_path / "a.flac")
    (tmp_path / "a.txt").write_text("a short transcript\n")
    shutil.copy(SPEECH / CLIPS[1], tmp_path / "b.flac")
    with open(tmp_path / "b.txt", "wb") as sparse:
        sparse.truncate(1 << 30)  # 1 GiB of holes: costs nothing on disk, a gigabyte if read
    with PeakMemory() as peak, time_limit(10):
        parsed = read_manifest(tmp_path)
    assert [e.row for e in parsed.examples] == [1]
    (problem,) = parsed.problems
    assert problem.row == 2 and "b.txt" in problem.reason, problem
    assert peak.traced < 16 << 20 and peak.resident < 64 << 20, (peak.traced, peak.resident)


def test_a_twenty_megabyte_transcript_is_refused_by_evaluate_quickly_in_bounded_memory(tmp_path):
    """Refused while the manifest is read, within 256 MiB of address space beyond the imports (it once took about 90
    times the text's size: 9 GB for 100 MB of text)."""
    model = save_model(tmp_path / "speech.pt", dims=SPEECH_DIMS)
    rows = [{"audio": str(HELLO), "text": "hello"}, {"audio": str(HELLO), "text": "w" * (20 << 20)}]
    manifest = write_manifest(tmp_path / "huge.jsonl", rows)
    started = time.monotonic()
    outcome = peak_memory(
        f"""
        from whisper_rope.evaluation.evaluate import evaluate
        evaluate(whisper_rope.load_model({str(model)!r}, device="cpu"), {str(manifest)!r})
        """,
        cap_bytes=256 << 20,
        timeout=120,
    )
    assert outcome["result"] == "refused", outcome
    assert "row 2: 'text' holds 20971520 characters" in outcome["message"], outcome
    assert outcome["growth"] < 200 << 20, mib(outcome["growth"])
    assert time.monotonic() - started < 60
