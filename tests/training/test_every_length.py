"""Training on windows of every length: the teacher's targets of composed windows, the cache across epochs and runs,
and the window lengths a checkpoint records."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from whisper.audio import log_mel_spectrogram, pad_or_trim
from whisper.decoding import DecodingOptions
from whisper.normalizers import EnglishTextNormalizer

import whisper_rope
from tests.conftest import FIXTURES, randomise_, small_dims
from tests.training.conftest import audio_folder
from whisper_rope.adapted_lengths import UNRECORDED_LIMIT_S, warn_outside
from whisper_rope.data import (
    IGNORE_INDEX,
    WindowPlan,
    composed_dataset,
    load_examples,
    prompt_tokens,
    target_sequence,
    window_audio,
    with_examples,
)
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.distributed import DistributedContext
from whisper_rope.training.loop import finetune
from whisper_rope.training.pipeline import _with_previous_texts
from whisper_rope.training.teacher_cache import TargetSpec, TeacherCache, TeacherTargetsDataset

SPEECH = FIXTURES / "speech"
ROWS = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]


def _windows(teacher, folder: Path, plan: WindowPlan, seed: int = 0):
    clips = load_examples(folder, teacher, pad_30s=False, teacher_30s=True, require_text=False)
    return composed_dataset(clips, plan, seed)


@pytest.fixture(scope="module")
def tiny_en():
    return whisper_rope.load_model("tiny.en", device="cpu").eval()


def test_the_teacher_labels_a_composed_window_with_its_clips_text_in_order(tmp_path, tiny_en):
    plan = WindowPlan(single_share=0.0, timestamp_share=0.0, sets=1)
    windows = _windows(tiny_en, audio_folder(tmp_path), plan)
    index = max(range(len(windows)), key=lambda i: len(windows.examples[i].pieces))
    window = windows.examples[index]
    assert len(window.pieces) >= 3
    cache = TeacherCache(tmp_path / "cache", tiny_en, TargetSpec(kinds=(), transcripts="teacher"))
    entries = cache.fill(windows, torch.device("cpu"), batch_size=2, progress=False)
    said = EnglishTextNormalizer()(windows.tokenizer(index).decode(cache.read(entries[index])["text_tokens"].tolist()))
    texts = {row["audio"]: row["text"] for row in ROWS}
    position = 0
    for piece in window.pieces:  # each clip's first and last words appear, clip after clip
        words = EnglishTextNormalizer()(texts[Path(piece.audio).name]).split()
        first, last = said.find(words[0], position), said.find(words[-1], position)
        assert position <= first <= last, (said, words)
        position = last


def test_windows_that_draw_timestamps_are_labelled_and_trained_with_timestamp_tokens(tmp_path, tiny_en):
    windows = _windows(tiny_en, audio_folder(tmp_path), WindowPlan(timestamp_share=1.0, sets=1))
    cache = TeacherCache(tmp_path / "cache", tiny_en, TargetSpec(kinds=("decoder_layers",), transcripts="teacher"))
    entries = cache.fill(windows, torch.device("cpu"), batch_size=4, progress=False)
    tokenizer = windows.tokenizer(0)
    item = TeacherTargetsDataset(windows, entries, "teacher")[0]
    text = cache.read(entries[0])["text_tokens"].tolist()
    stamps = [t for t in text if t >= tokenizer.timestamp_begin]
    assert len(stamps) >= 2 and stamps[0] == tokenizer.timestamp_begin  # <|0.00|> opens the text
    assert item.tokens.tolist() == target_sequence(tokenizer, text, timestamps=True)[0]
    assert tokenizer.no_timestamps not in item.tokens.tolist()
    assert item.tokens.tolist()[: len(tokenizer.sot_sequence)] == list(tokenizer.sot_sequence)
    # The teacher's decoder states cover the sequence it was forced with, timestamps included.
    assert cache.read(entries[0])["decoder_layers"].shape[1] == len(item.tokens)


def test_the_cache_is_read_on_the_second_epoch_and_by_a_second_run(tmp_path):
    teacher = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05).eval()
    folder = audio_folder(tmp_path)
    plan = WindowPlan(sets=2)
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=("decoder_layers",), transcripts="teacher"))
    first = cache.fill(_windows(teacher, folder, plan), torch.device("cpu"), batch_size=4, progress=False)
    assert cache.computed == len(first) >= 4  # two sets of windows, each holding every clip once
    again = cache.fill(_windows(teacher, folder, plan), torch.device("cpu"), batch_size=4, progress=False)
    assert cache.computed == 0 and again == first
    cache.fill(_windows(teacher, folder, plan, seed=1), torch.device("cpu"), batch_size=4, progress=False)
    assert cache.computed > 0  # another seed composes other windows


def test_a_label_free_run_records_the_window_lengths_it_trained_on(tmp_path):
    torch.manual_seed(3)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05)
    source = whisper_rope.save_checkpoint(model, tmp_path / "source.pt")
    config = FinetuneConfig.from_recipe(
        "unpadded-sliced", model=str(source), train=str(audio_folder(tmp_path)), output=str(tmp_path / "run"),
        steps=2, batch_size=2, warmup_steps=1, eval_holdout=2, num_workers=0, progress=False, device="cpu",
        teacher_cache=str(tmp_path / "cache"), clip_part_share=0.5, window_sets=3, seed=1,
    )  # fmt: skip
    assert config.windows == "every-length"
    result = finetune(config=config)
    loaded = whisper_rope.load_model(result.model_path, device="cpu")
    low, high = loaded.adapted_seconds
    assert loaded.unpadded and loaded.adapted_seconds == result.model.adapted_seconds
    assert low < 3.0 and high > 6.0  # parts of clips (1-3 s) and windows of several joined clips


def test_unpadded_input_far_longer_than_the_adapted_windows_is_warned_about_once(caplog):
    model = whisper_rope.build_model(small_dims(), "whisper")
    model.unpadded, model.adapted_seconds = True, (2.0, 6.0)
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        assert not warn_outside(model, 10.0)  # within 1.5 x 6 s + margin
        assert warn_outside(model, 20.0)
        assert not warn_outside(model, 25.0)  # once per model
    assert len(caplog.records) == 1 and "2.0-6.0 s" in caplog.text and "--recipe unpadded-sliced" in caplog.text
    every = whisper_rope.build_model(small_dims(), "whisper")
    every.unpadded, every.adapted_seconds = True, (1.2, 29.5)
    assert not warn_outside(every, 600.0)  # a long recording is read in 30-s windows: within range
    legacy = whisper_rope.build_model(small_dims(), "whisper")
    legacy.unpadded, legacy.trained_unpadded = True, True  # adapted before lengths were recorded
    assert not warn_outside(legacy, UNRECORDED_LIMIT_S) and warn_outside(legacy, 45.0)
    padded = whisper_rope.build_model(small_dims(), "whisper")
    padded.adapted_seconds = (2.0, 6.0)  # padded decoding: the 30-s window it always had
    assert not warn_outside(padded, 30.0)


def test_windows_after_a_previous_text_are_labelled_after_the_teachers_transcript_of_it(tmp_path, tiny_en):
    windows = _windows(tiny_en, audio_folder(tmp_path), WindowPlan(previous_share=1.0, timestamp_share=0.0, sets=1))
    following = [i for i, w in enumerate(windows.examples) if w.after is not None]
    assert following
    cache = TeacherCache(tmp_path / "cache", tiny_en, TargetSpec(kinds=("decoder_layers",), transcripts="teacher"))
    config = FinetuneConfig(model="tiny.en", train="unused", output=str(tmp_path / "run"), batch_size=2, num_workers=0)
    prompted = _with_previous_texts(cache, windows, DistributedContext(), config, progress=False)
    entries = cache.fill(prompted, torch.device("cpu"), batch_size=2, progress=False)
    assert cache.computed == len(following)  # the windows they follow were transcribed first, and are read now
    tokenizer = prompted.tokenizer(0)
    for i in following:
        window = prompted.examples[i]
        before = tokenizer.decode(cache.read(entries[window.after])["text_tokens"].tolist())
        assert window.prompt == before and before.strip()
        item = TeacherTargetsDataset(prompted, entries, "teacher", ("decoder_layers",))[i]
        tokens = item.tokens.tolist()
        # <|startofprev|> and the previous transcript lead the sequence, without loss on them, then the window's own
        head = prompt_tokens(tokenizer, before, tiny_en.dims.n_text_ctx)
        assert tokens[: len(head)] == head and head[0] == tokenizer.sot_prev
        assert (item.labels[: len(head)] == IGNORE_INDEX).all()
        # the teacher's transcript is the one it writes when it decodes the window after that prompt
        mel = log_mel_spectrogram(pad_or_trim(torch.from_numpy(window_audio(window))))  # the teacher's 30-s window
        alone = tiny_en.decode(mel, DecodingOptions(language="en", without_timestamps=True, prompt=before, fp16=False))
        said = tokenizer.decode(cache.read(entries[i])["text_tokens"].tolist())
        assert EnglishTextNormalizer()(said) == EnglishTextNormalizer()(alone.text)


def test_a_branched_window_is_labelled_with_the_teachers_second_choice_and_what_it_decodes_after_it(tmp_path, tiny_en):
    plan = WindowPlan(branch_share=1.0, single_share=0.0, timestamp_share=0.0, previous_share=0.0, sets=1)
    drawn = _windows(tiny_en, audio_folder(tmp_path), plan)
    assert all(w.branch is not None for w in drawn.examples)
    windows = with_examples(drawn, [replace(drawn.examples[0], branch=0.0), *drawn.examples[1:]])  # one first word
    greedy = with_examples(windows, [replace(w, branch=None) for w in windows.examples])
    cache = TeacherCache(tmp_path / "cache", tiny_en, TargetSpec(kinds=("decoder_layers",), transcripts="teacher"))
    plain = cache.fill(greedy, torch.device("cpu"), batch_size=4, progress=False)
    entries = cache.fill(windows, torch.device("cpu"), batch_size=4, progress=False)
    assert cache.computed == len(windows) and not set(plain) & set(entries)  # entries of their own
    tokenizer = windows.tokenizer(0)
    for i, window in enumerate(windows.examples):
        first = cache.read(plain[i])["text_tokens"].tolist()
        said = cache.read(entries[i])["text_tokens"].tolist()
        words = [j for j, t in enumerate(first) if t < tokenizer.eot]
        at = words[int(window.branch * len(words))]
        assert said[:at] == first[:at] and said[at] != first[at] and said[at] < tokenizer.eot
        # the second choice is the teacher's best other word there
        tokens = torch.tensor([target_sequence(tokenizer, first)[0]])
        mel = log_mel_spectrogram(pad_or_trim(torch.from_numpy(window_audio(window))))[None]
        scores = tiny_en.logits(tokens, tiny_en.embed_audio(mel))[
            0, len(tokenizer.sot_sequence_including_notimestamps) - 1 + at
        ]
        scores[tokenizer.eot :], scores[first[at]] = float("-inf"), float("-inf")
        assert said[at] == int(scores.argmax())
        # and the rest is what the teacher writes after that prefix
        after = tiny_en.decode(
            mel[0], DecodingOptions(language="en", without_timestamps=True, fp16=False, prefix=said[: at + 1])
        )
        assert said[at + 1 :] == list(after.tokens)
        item = TeacherTargetsDataset(windows, entries, "teacher", ("decoder_layers",))[i]
        assert item.tokens.tolist() == target_sequence(tokenizer, said)[0]  # trained on the branched sequence
        assert cache.read(entries[i])["decoder_layers"].shape[1] == len(item.tokens)
