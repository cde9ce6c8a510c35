"""Manifests (whisper_rope.data.manifest): formats, relative paths, bad rows named by number, audio checks."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import small_dims
from tests.data.conftest import ROWS, SPEECH, write_file
from whisper_rope import build_model
from whisper_rope.data.dataset import load_examples
from whisper_rope.data.manifest import DataError, check_audio, read_manifest


def test_jsonl_relative_paths_resolve_against_the_manifest_folder_from_any_cwd(clips, tmp_path, monkeypatch):
    lines = [json.dumps({"audio": f"audio/{r['audio']}", "text": r["text"]}) for r in ROWS[:3]]
    manifest = write_file(clips / "train.jsonl", "\n".join(lines) + "\n\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parsed = read_manifest(manifest)
    assert [e.row for e in parsed.examples] == [1, 2, 3]
    assert [e.text for e in parsed.examples] == [r["text"] for r in ROWS[:3]]
    assert all(Path(e.audio).is_absolute() and Path(e.audio).is_file() for e in parsed.examples)
    checked = check_audio(parsed)
    assert checked.problems == []
    assert checked.examples[0].duration == pytest.approx(sf.info(SPEECH / ROWS[0]["audio"]).duration)


def test_csv_handles_quoted_commas_newlines_optional_columns_and_a_byte_order_mark(clips):
    text = (
        "\ufeffaudio,text,language,start,end,prompt\n"
        f'audio/{ROWS[0]["audio"]},"Hello, world",en,,,\n'
        f'audio/{ROWS[1]["audio"]},"a transcript\nover two lines",,0.5,2.0,"earlier words"\n'
        f"audio/{ROWS[2]['audio']},plain,,,,\n"
    )
    parsed = read_manifest(write_file(clips / "train.csv", text))
    assert parsed.problems == []
    first, second, third = parsed.examples
    assert (first.text, first.language, first.start, first.end) == ("Hello, world", "en", None, None)
    assert second.text == "a transcript\nover two lines"
    assert (second.start, second.end, second.prompt) == (0.5, 2.0, "earlier words")
    assert [e.row for e in parsed.examples] == [2, 3, 5]  # a record's first line; the quoted newline spans 3-4
    assert check_audio(parsed).examples[1].duration == pytest.approx(1.5)


def test_tsv_manifest_reads_tab_separated_rows(clips):
    text = "audio\ttext\n" + "".join(f"audio/{r['audio']}\t{r['text']}\n" for r in ROWS[:3])
    parsed = read_manifest(write_file(clips / "train.tsv", text))
    assert [e.text for e in parsed.examples] == [r["text"] for r in ROWS[:3]]


def test_bad_jsonl_rows_are_skipped_with_row_numbers_or_raise_under_strict(clips):
    good = json.dumps({"audio": f"audio/{ROWS[0]['audio']}", "text": ROWS[0]["text"]})
    lines = [
        good,
        "{not json",
        json.dumps({"audio": f"audio/{ROWS[1]['audio']}"}),
        json.dumps({"audio": f"audio/{ROWS[1]['audio']}", "text": "   "}),
        json.dumps(["a", "list"]),
        json.dumps({"audio": "audio/missing.flac", "text": "gone"}),
        json.dumps({"audio": f"audio/{ROWS[2]['audio']}", "text": "x", "start": 2, "end": 1}),
        json.dumps({"audio": f"audio/{ROWS[2]['audio']}", "text": "x", "start": "soon"}),
    ]
    manifest = write_file(clips / "bad.jsonl", "\n".join(lines) + "\n")
    checked = check_audio(read_manifest(manifest))
    assert [e.row for e in checked.examples] == [1]
    reasons = {p.row: p.reason for p in checked.problems}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert "not valid JSON" in reasons[2]
    assert reasons[3] == "has no 'text' column"
    assert reasons[4] == "has an empty transcript"
    assert "JSON list" in reasons[5]
    assert "missing.flac" in reasons[6] and "does not exist" in reasons[6]
    assert "end 1 s is not after start 2 s" in reasons[7]
    assert "start must be a number of seconds" in reasons[8]
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: is not valid JSON"):
        read_manifest(manifest, strict=True)


def test_non_utf8_rows_are_skipped_and_named(clips):
    good = f'{{"audio": "audio/{ROWS[0]["audio"]}", "text": "fine"}}\n'.encode()
    latin1 = f'{{"audio": "audio/{ROWS[1]["audio"]}", "text": "caf\xe9"}}\n'.encode("latin-1")
    parsed = read_manifest(write_file(clips / "mixed.jsonl", good + latin1))
    assert [e.row for e in parsed.examples] == [1]
    assert [str(p) for p in parsed.problems] == ["row 2: is not valid UTF-8"]

    csv_bytes = b"audio,text\n" + f"audio/{ROWS[0]['audio']},caf\xe9\n".encode("latin-1")
    csv_bytes += f"audio/{ROWS[1]['audio']},ok\n".encode()
    parsed = read_manifest(write_file(clips / "mixed.csv", csv_bytes))
    assert [e.text for e in parsed.examples] == ["ok"]
    assert [str(p) for p in parsed.problems] == ["row 2: is not valid UTF-8"]
    with pytest.raises(DataError, match=r"mixed\.csv, row 2: is not valid UTF-8"):
        read_manifest(clips / "mixed.csv", strict=True)


def test_csv_rows_with_missing_fields_are_skipped_and_a_header_without_text_is_an_error(clips):
    text = f"audio,text\naudio/{ROWS[0]['audio']}\naudio/{ROWS[1]['audio']},fine\n"
    parsed = read_manifest(write_file(clips / "short.csv", text))
    assert [e.row for e in parsed.examples] == [3]
    assert [str(p) for p in parsed.problems] == ["row 2: has 1 fields, the header has 2"]
    with pytest.raises(DataError, match="has no 'text' column in its header"):
        read_manifest(write_file(clips / "notext.csv", "audio,words\nx.flac,hello\n"))
    # Untranscribed manifests (distillation from the teacher's own transcripts) need no text column.
    assert read_manifest(clips / "notext.csv", require_text=False).examples[0].text is None


def test_empty_and_unusable_manifests_are_errors_naming_the_file(clips):
    model = build_model(small_dims(), "rotary")
    with pytest.raises(DataError, match=r"empty\.jsonl' is empty"):
        load_examples(write_file(clips / "empty.jsonl", "\n\n"), model, pad_30s=False)
    with pytest.raises(DataError, match=r"header\.csv' is empty"):
        load_examples(write_file(clips / "header.csv", "audio,text\n"), model, pad_30s=False)
    unusable = write_file(clips / "unusable.jsonl", '{"audio": "nope.flac", "text": "x"}\n')
    with pytest.raises(DataError, match=r"unusable\.jsonl' has no usable rows \(1 skipped: row 1: audio file"):
        load_examples(unusable, model, pad_30s=False)
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(clips / "absent.jsonl")
    with pytest.raises(DataError, match="unknown suffix '.txt'"):
        read_manifest(write_file(clips / "list.txt", "x"))


def test_directory_of_audio_with_same_named_transcripts(clips):
    folder = clips / "audio"
    (folder / ROWS[0]["audio"]).with_suffix(".txt").write_text("  first\ntranscript \n")
    (folder / ROWS[1]["audio"]).with_suffix(".txt").write_text(ROWS[1]["text"])
    parsed = read_manifest(folder)
    by_name = {Path(e.audio).name: e.text for e in parsed.examples}
    assert by_name == {ROWS[0]["audio"]: "first transcript", ROWS[1]["audio"]: ROWS[1]["text"]}
    assert len(parsed.problems) == 1 and "has no transcript" in parsed.problems[0].reason


def test_clips_over_30_seconds_are_skipped_but_a_short_span_of_them_is_used(tmp_path):
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(31 * 16000, dtype=np.float32) + 0.01, 16000)
    lines = [
        json.dumps({"audio": "long.wav", "text": "too long"}),
        json.dumps({"audio": "long.wav", "text": "a span", "start": 10.0, "end": 12.5}),
        json.dumps({"audio": "long.wav", "text": "past the end", "start": 29.0, "end": 33.0}),
    ]
    checked = check_audio(read_manifest(write_file(tmp_path / "m.jsonl", "\n".join(lines))))
    assert [(e.row, e.duration) for e in checked.examples] == [(2, pytest.approx(2.5))]
    reasons = {p.row: p.reason for p in checked.problems}
    assert "31.0 s long; a Whisper window holds at most 30 s" in reasons[1]
    assert "end 33 s is past the end" in reasons[3]
    with pytest.raises(DataError, match="row 1: clip is 31.0 s long"):
        check_audio(read_manifest(tmp_path / "m.jsonl"), strict=True)


def test_jsonl_text_may_hold_unicode_line_separators_and_rows_count_newlines_only(tmp_path):
    texts = ["first", "line\u2028separator", "next\x85line", "last"]
    lines = [json.dumps({"audio": "a.flac", "text": t}, ensure_ascii=False) for t in texts]
    parsed = read_manifest(write_file(tmp_path / "m.jsonl", "\r\n".join(lines)))
    assert [(e.row, e.text) for e in parsed.examples] == list(enumerate(texts, start=1))
    assert parsed.problems == []


def test_an_unterminated_csv_quote_is_reported_and_the_rows_after_it_are_still_read(tmp_path):
    text = 'audio,text\na.flac,one\nb.flac,"never closed\nc.flac,three\nd.flac,four\n'
    parsed = read_manifest(write_file(tmp_path / "m.csv", text))
    assert [(e.row, e.text) for e in parsed.examples] == [(2, "one"), (4, "three"), (5, "four")]
    assert [str(p) for p in parsed.problems] == ["row 3: is not valid CSV (a quote that is never closed)"]
    stray = read_manifest(write_file(tmp_path / "n.csv", 'audio,text\na.flac,"quoted"tail\nb.flac,fine\n'))
    assert [e.text for e in stray.examples] == ["fine"] and stray.problems[0].row == 2
