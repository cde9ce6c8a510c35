"""Manifests, target sequences, features and batching (whisper_rope.data)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from whisper.tokenizer import get_tokenizer

from tests.conftest import FIXTURES, small_dims
from whisper_rope import build_model
from whisper_rope.data import (
    IGNORE_INDEX,
    BucketBatchSampler,
    Collator,
    DataError,
    Example,
    TokenizerSpec,
    check_audio,
    eval_batches,
    load_examples,
    make_loader,
    read_manifest,
    spec_augment_,
    target_sequence,
)

SPEECH = FIXTURES / "speech"
ROWS = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    """tmp/audio/ holding three fixture clips; manifests go in tmp/ with paths relative to it."""
    (tmp_path / "audio").mkdir()
    for row in ROWS[:3]:
        shutil.copy(SPEECH / row["audio"], tmp_path / "audio" / row["audio"])
    return tmp_path


def _write(path: Path, data: "str | bytes") -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_jsonl_relative_paths_resolve_against_the_manifest_folder_from_any_cwd(clips, tmp_path, monkeypatch):
    lines = [json.dumps({"audio": f"audio/{r['audio']}", "text": r["text"]}) for r in ROWS[:3]]
    manifest = _write(clips / "train.jsonl", "\n".join(lines) + "\n\n")
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
    parsed = read_manifest(_write(clips / "train.csv", text))
    assert parsed.problems == []
    first, second, third = parsed.examples
    assert (first.text, first.language, first.start, first.end) == ("Hello, world", "en", None, None)
    assert second.text == "a transcript\nover two lines"
    assert (second.start, second.end, second.prompt) == (0.5, 2.0, "earlier words")
    assert [e.row for e in parsed.examples] == [2, 3, 5]  # a record's first line; the quoted newline spans 3-4
    assert check_audio(parsed).examples[1].duration == pytest.approx(1.5)


def test_tsv_manifest_reads_tab_separated_rows(clips):
    text = "audio\ttext\n" + "".join(f"audio/{r['audio']}\t{r['text']}\n" for r in ROWS[:3])
    parsed = read_manifest(_write(clips / "train.tsv", text))
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
    manifest = _write(clips / "bad.jsonl", "\n".join(lines) + "\n")
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
    parsed = read_manifest(_write(clips / "mixed.jsonl", good + latin1))
    assert [e.row for e in parsed.examples] == [1]
    assert [str(p) for p in parsed.problems] == ["row 2: is not valid UTF-8"]

    csv_bytes = b"audio,text\n" + f"audio/{ROWS[0]['audio']},caf\xe9\n".encode("latin-1")
    csv_bytes += f"audio/{ROWS[1]['audio']},ok\n".encode()
    parsed = read_manifest(_write(clips / "mixed.csv", csv_bytes))
    assert [e.text for e in parsed.examples] == ["ok"]
    assert [str(p) for p in parsed.problems] == ["row 2: is not valid UTF-8"]
    with pytest.raises(DataError, match=r"mixed\.csv, row 2: is not valid UTF-8"):
        read_manifest(clips / "mixed.csv", strict=True)


def test_csv_rows_with_missing_fields_are_skipped_and_a_header_without_text_is_an_error(clips):
    text = f"audio,text\naudio/{ROWS[0]['audio']}\naudio/{ROWS[1]['audio']},fine\n"
    parsed = read_manifest(_write(clips / "short.csv", text))
    assert [e.row for e in parsed.examples] == [3]
    assert [str(p) for p in parsed.problems] == ["row 2: has 1 fields, the header has 2"]
    with pytest.raises(DataError, match="has no 'text' column in its header"):
        read_manifest(_write(clips / "notext.csv", "audio,words\nx.flac,hello\n"))
    # Untranscribed manifests (distillation from the teacher's own transcripts) need no text column.
    assert read_manifest(clips / "notext.csv", require_text=False).examples[0].text is None


def test_empty_and_unusable_manifests_are_errors_naming_the_file(clips):
    model = build_model(small_dims(), "rotary")
    with pytest.raises(DataError, match=r"empty\.jsonl' is empty"):
        load_examples(_write(clips / "empty.jsonl", "\n\n"), model, pad_30s=False)
    with pytest.raises(DataError, match=r"header\.csv' is empty"):
        load_examples(_write(clips / "header.csv", "audio,text\n"), model, pad_30s=False)
    unusable = _write(clips / "unusable.jsonl", '{"audio": "nope.flac", "text": "x"}\n')
    with pytest.raises(DataError, match=r"unusable\.jsonl' has no usable rows \(1 skipped: row 1: audio file"):
        load_examples(unusable, model, pad_30s=False)
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(clips / "absent.jsonl")
    with pytest.raises(DataError, match="unknown suffix '.txt'"):
        read_manifest(_write(clips / "list.txt", "x"))


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
    checked = check_audio(read_manifest(_write(tmp_path / "m.jsonl", "\n".join(lines))))
    assert [(e.row, e.duration) for e in checked.examples] == [(2, pytest.approx(2.5))]
    reasons = {p.row: p.reason for p in checked.problems}
    assert "31.0 s long; a Whisper window holds at most 30 s" in reasons[1]
    assert "end 33 s is past the end" in reasons[3]
    with pytest.raises(DataError, match="row 1: clip is 31.0 s long"):
        check_audio(read_manifest(tmp_path / "m.jsonl"), strict=True)


def test_token_sequences_longer_than_the_text_context_are_skipped(clips):
    lines = [
        json.dumps({"audio": f"audio/{ROWS[0]['audio']}", "text": "short"}),
        json.dumps({"audio": f"audio/{ROWS[1]['audio']}", "text": " ".join(["word"] * 40)}),
    ]
    model = build_model(small_dims(n_text_ctx=16), "rotary")
    dataset = load_examples(_write(clips / "m.jsonl", "\n".join(lines)), model, pad_30s=False)
    assert len(dataset) == 1
    assert [str(p) for p in dataset.problems] == [
        "row 2: has 42 decoder input tokens; the model's text context holds 16"
    ]


def test_target_sequence_trains_only_text_and_eot_and_puts_the_prompt_before_sot():
    tokenizer = get_tokenizer(True, language="de", task="transcribe")
    text = tokenizer.encode(" Guten Tag")
    prompt = [tokenizer.sot_prev] + tokenizer.encode(" vorher")
    tokens, labels = target_sequence(tokenizer, text, prompt)
    sot = list(tokenizer.sot_sequence_including_notimestamps)
    assert sot == [tokenizer.sot, tokenizer.special_tokens["<|de|>"], tokenizer.transcribe, tokenizer.no_timestamps]
    assert tokens == prompt + sot + text
    assert labels == [IGNORE_INDEX] * (len(prompt) + len(sot) - 1) + text + [tokenizer.eot]


def test_row_languages_pick_the_multilingual_sot_sequence_and_english_models_refuse_others():
    multilingual = TokenizerSpec(multilingual=True, num_languages=99, n_text_ctx=448, default_language="fr")
    assert multilingual.language_of(Example("a.flac", "x", 1, language="German")) == "de"
    assert multilingual.language_of(Example("a.flac", "x", 1)) == "fr"
    english = TokenizerSpec(multilingual=False, num_languages=99, n_text_ctx=448)
    assert english.language_of(Example("a.flac", "x", 1)) == "en"
    with pytest.raises(ValueError, match="language 'de' given, but the model is English-only"):
        english.language_of(Example("a.flac", "x", 1, language="de"))


def _speech_manifest(folder: Path, rows=ROWS, **extra) -> Path:
    lines = [json.dumps({"audio": str(SPEECH / r["audio"]), "text": r["text"], **extra}) for r in rows]
    return _write(folder / "speech.jsonl", "\n".join(lines))


def test_unpadded_batches_are_zero_padded_to_the_longest_even_frame_count(tmp_path):
    model = build_model(small_dims(), "rotary")
    dataset = load_examples(_speech_manifest(tmp_path, ROWS[:3]), model, pad_30s=False)
    items = [dataset[i] for i in range(3)]
    batch = Collator(dataset.tokenizer(0).eot, padded_30s=False)(items)
    frames = [_frames_transcription_keeps(SPEECH / r["audio"]) for r in ROWS[:3]]
    assert batch.frames.tolist() == frames
    assert batch.mel.shape == (3, 80, max(frames))
    assert batch.n_frames is batch.frames
    for row, n in enumerate(frames):
        assert torch.equal(batch.mel[row, :, :n], items[row].mel)
        assert not batch.mel[row, :, n:].any()
        n_tokens = len(items[row].tokens)
        assert torch.equal(batch.tokens[row, :n_tokens], items[row].tokens)
        assert (batch.tokens[row, n_tokens:] == dataset.tokenizer(0).eot).all()
        assert (batch.labels[row, n_tokens:] == IGNORE_INDEX).all()
    assert batch.seconds == pytest.approx([sf.info(SPEECH / r["audio"]).duration for r in ROWS[:3]])


def _frames_transcription_keeps(path: Path) -> int:
    """How many frames of a clip an unpadded model is fed in transcription (its 30-s window, cut at the padding)."""
    import whisper

    from whisper_rope.features import real_frame_counts

    return int(real_frame_counts(whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(path))))))


def test_unpadded_training_cuts_clips_where_unpadded_transcription_does(tmp_path):
    """A clip's own trailing digital silence cannot be told from padding in transcription: training drops it too."""
    import whisper

    from whisper_rope.features import real_frame_counts

    speech, _ = sf.read(SPEECH / ROWS[0]["audio"], dtype="float32")
    with_silence = tmp_path / "with_silence.flac"
    sf.write(with_silence, np.concatenate([speech, np.zeros(8000, dtype=np.float32)]), 16000)  # + 0.5 s
    manifest = _write(tmp_path / "m.jsonl", json.dumps({"audio": str(with_silence), "text": ROWS[0]["text"]}) + "\n")
    item = load_examples(manifest, build_model(small_dims(), "rotary"), pad_30s=False)[0]
    window = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(with_silence))))
    expected = int(real_frame_counts(window))
    assert item.frames == expected <= (len(speech) + 8000) // 160 - 48  # the half second is gone
    assert torch.equal(item.mel, window[:, :expected])  # the very values transcription feeds


def test_thirty_second_windows_pad_the_audio_with_silence_like_upstream(tmp_path):
    import whisper

    model = build_model(small_dims(n_audio_ctx=1500), "whisper")
    dataset = load_examples(_speech_manifest(tmp_path, ROWS[:1]), model, pad_30s=True)
    item = dataset[0]
    expected = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(SPEECH / ROWS[0]["audio"]))))
    assert item.mel.shape == (80, 3000)
    assert torch.allclose(item.mel, expected, atol=1e-4)
    assert item.frames == int(sf.info(SPEECH / ROWS[0]["audio"]).frames) // 160
    batch = Collator(0, padded_30s=True)([item])
    assert batch.n_frames is None  # the model gets full windows, no frame counts


def test_sampler_is_seeded_resumable_and_buckets_by_duration():
    durations = [float(d) for d in np.random.default_rng(1).uniform(1, 20, size=50)]
    sampler = BucketBatchSampler(durations, batch_size=4, seed=7, bucket_batches=3)
    stream = iter(sampler)
    first = [next(stream) for _ in range(30)]  # 12 batches per epoch: crosses two epoch boundaries
    assert first == [b for _, b in zip(range(30), iter(BucketBatchSampler(durations, 4, seed=7, bucket_batches=3)))]
    assert first[:12] != [b for _, b in zip(range(12), iter(BucketBatchSampler(durations, 4, seed=8)))]
    epoch = [i for batch in first[:12] for i in batch]
    assert len(set(epoch)) == 48  # each example at most once per epoch (50 % 4 dropped)
    for batch in first:  # sorted within a window of 3 batches: a batch spans a third of the range at most
        spread = max(durations[i] for i in batch) - min(durations[i] for i in batch)
        assert spread < 19 * 0.6

    state = {**sampler.state_dict(), "position": 17}
    restored = BucketBatchSampler(durations, 4, seed=7, bucket_batches=3)
    restored.load_state_dict(state)
    assert [b for _, b in zip(range(13), iter(restored))] == first[17:30]
    with pytest.raises(ValueError, match="saved with batch_size=4, this run has 8"):
        BucketBatchSampler(durations, 8, seed=7).load_state_dict(state)


def test_distributed_ranks_split_each_global_batch():
    durations = list(range(1, 21))
    whole = [b for _, b in zip(range(10), iter(BucketBatchSampler(durations, 4, seed=3)))]
    ranks = [
        [b for _, b in zip(range(10), iter(BucketBatchSampler(durations, 4, seed=3, rank=r, world_size=2)))]
        for r in (0, 1)
    ]
    for step, batch in enumerate(whole):
        assert ranks[0][step] + ranks[1][step] == batch[0::2] + batch[1::2]
        assert len(ranks[0][step]) == len(ranks[1][step]) == 2
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        BucketBatchSampler(durations, 3, world_size=2)
    with pytest.raises(ValueError, match="larger than the 20 usable training examples"):
        BucketBatchSampler(durations, 24)


def test_worker_processes_give_the_same_batches_in_the_same_order(tmp_path):
    model = build_model(small_dims(), "rotary")
    dataset = load_examples(_speech_manifest(tmp_path, ROWS[:4]), model, pad_30s=False)
    batches = {}
    for workers in (0, 2):
        stream = iter(make_loader(dataset, BucketBatchSampler(dataset.durations, 2, seed=5), num_workers=workers))
        batches[workers] = [next(stream) for _ in range(3)]
    for a, b in zip(batches[0], batches[2]):
        assert a.indices == b.indices
        assert torch.equal(a.mel, b.mel) and torch.equal(a.tokens, b.tokens) and torch.equal(a.frames, b.frames)


def test_undecodable_audio_found_late_is_replaced_by_the_next_clip(tmp_path):
    model = build_model(small_dims(), "rotary")
    dataset = load_examples(_speech_manifest(tmp_path, ROWS[:2]), model, pad_30s=False)
    broken = tmp_path / "broken.flac"
    broken.write_bytes((SPEECH / ROWS[0]["audio"]).read_bytes()[:200])  # the header survives, the audio does not
    dataset.examples[0] = Example(str(broken), ROWS[0]["text"], 1, duration=1.0)
    item = dataset[0]
    assert (item.index, item.replaced_row) == (1, 1)
    dataset.strict = True
    with pytest.raises(DataError, match="row 1: audio file"):
        dataset[0]


def test_eval_batches_cover_every_clip_once_sorted_by_duration(tmp_path):
    model = build_model(small_dims(), "rotary")
    dataset = load_examples(_speech_manifest(tmp_path), model, pad_30s=False)
    batches = eval_batches(dataset, 3)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(ROWS))) and [len(b) for b in batches] == [3, 3, 2]
    assert [dataset.durations[i] for i in order] == sorted(dataset.durations)


def test_spec_augment_masks_only_real_frames_and_is_reproducible():
    mel = torch.rand(80, 300) + 1
    frames = torch.tensor(200)
    a = spec_augment_(mel.clone(), frames, torch.Generator().manual_seed(3), time_width=40)
    b = spec_augment_(mel.clone(), frames, torch.Generator().manual_seed(3), time_width=40)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 200:], mel[:, 200:])  # padding untouched
    masked = a[:, :200] == 0
    assert masked.any()
    masked_rows = masked.all(dim=1).sum()
    masked_columns = masked.all(dim=0).sum()
    assert masked_rows <= 2 * 27 and masked_columns <= 2 * 20  # at most 10% of 200 frames per time mask


def test_jsonl_text_may_hold_unicode_line_separators_and_rows_count_newlines_only(tmp_path):
    texts = ["first", "line\u2028separator", "next\x85line", "last"]
    lines = [json.dumps({"audio": "a.flac", "text": t}, ensure_ascii=False) for t in texts]
    parsed = read_manifest(_write(tmp_path / "m.jsonl", "\r\n".join(lines)))
    assert [(e.row, e.text) for e in parsed.examples] == list(enumerate(texts, start=1))
    assert parsed.problems == []


def test_an_unterminated_csv_quote_is_reported_and_the_rows_after_it_are_still_read(tmp_path):
    text = 'audio,text\na.flac,one\nb.flac,"never closed\nc.flac,three\nd.flac,four\n'
    parsed = read_manifest(_write(tmp_path / "m.csv", text))
    assert [(e.row, e.text) for e in parsed.examples] == [(2, "one"), (4, "three"), (5, "four")]
    assert [str(p) for p in parsed.problems] == ["row 3: is not valid CSV (a quote that is never closed)"]
    stray = read_manifest(_write(tmp_path / "n.csv", 'audio,text\na.flac,"quoted"tail\nb.flac,fine\n'))
    assert [e.text for e in stray.examples] == ["fine"] and stray.problems[0].row == 2
