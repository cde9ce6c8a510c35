"""Target sequences, features and batching (whisper_rope.data.dataset)."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from whisper.tokenizer import get_tokenizer

from tests.conftest import small_dims
from tests.data.conftest import ROWS, SPEECH, write_file
from whisper_rope import build_model
from whisper_rope.data import (
    IGNORE_INDEX,
    BucketBatchSampler,
    Collator,
    DataError,
    Example,
    TokenizerSpec,
    eval_batches,
    load_examples,
    make_loader,
    spec_augment_,
    target_sequence,
)


def test_token_sequences_longer_than_the_text_context_are_skipped(clips):
    lines = [
        json.dumps({"audio": f"audio/{ROWS[0]['audio']}", "text": "short"}),
        json.dumps({"audio": f"audio/{ROWS[1]['audio']}", "text": " ".join(["word"] * 40)}),
    ]
    model = build_model(small_dims(n_text_ctx=16), "rotary")
    dataset = load_examples(write_file(clips / "m.jsonl", "\n".join(lines)), model, pad_30s=False)
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
    return write_file(folder / "speech.jsonl", "\n".join(lines))


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
    manifest = write_file(
        tmp_path / "m.jsonl", json.dumps({"audio": str(with_silence), "text": ROWS[0]["text"]}) + "\n"
    )
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
