"""The clips a label-free run holds out (whisper_rope.training.holdout): drawn among clips that decode, kept by a
resume."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from whisper.audio import SAMPLE_RATE

import whisper_rope
from tests.conftest import FIXTURES, randomise_, small_dims
from whisper_rope.audio import load_audio
from whisper_rope.data import DataError
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.holdout import (
    EVERY_LENGTH_MANIFEST,
    HOLDOUT_MANIFEST,
    TRAIN_MANIFEST,
    WINDOW_BUCKETS,
    every_length_holdout,
    split_holdout,
)
from whisper_rope.training.loop import finetune
from whisper_rope.training.state import STATE_FILE, latest_checkpoint

SPEECH = FIXTURES / "speech"
CLIPS = sorted(SPEECH.glob("*.flac"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05)
    return whisper_rope.save_checkpoint(model, tmp_path_factory.mktemp("source") / "source.pt")


def _folder(tmp_path: Path, clips=CLIPS, noise: int = 0) -> Path:
    """A folder of untranscribed audio: links to ``clips`` and ``noise`` .mp3 files of random bytes."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for clip in clips:
        (folder / clip.name).symlink_to(clip)
    generator = random.Random(0)
    for index in range(noise):
        (folder / f"noise{index}.mp3").write_bytes(bytes(generator.randrange(256) for _ in range(4000)))
    return folder


def _audio(manifest: Path) -> list:
    return [json.loads(line)["audio"] for line in manifest.read_text().splitlines()]


def test_held_out_clips_are_drawn_only_among_clips_whose_audio_decodes(tmp_path):
    folder = _folder(tmp_path, noise=4)
    for seed in range(6):
        output = tmp_path / f"run{seed}"
        train, held_out = split_holdout(folder, 3, seed, output)
        assert len(held_out) == 3 and all(e.audio.endswith(".flac") for e in held_out), [e.audio for e in held_out]
        assert sorted(_audio(train) + [e.audio for e in held_out]) == sorted(str(p) for p in folder.iterdir())
    with pytest.raises(DataError, match=f"--eval-holdout {len(CLIPS) + 1}: only {len(CLIPS)} clips of .* decodes"):
        split_holdout(folder, len(CLIPS) + 1, 0, tmp_path / "greedy")


def test_a_resumed_run_keeps_its_hold_out_whatever_the_folder_holds_now(tmp_path, source):
    folder = _folder(tmp_path, CLIPS[:-2])
    run = tmp_path / "run"
    settings = dict(
        model=str(source), train=str(folder), output=str(run), batch_size=2, eval_holdout=2, num_workers=0,
        progress=False, device="cpu", teacher_cache=str(tmp_path / "cache"), save_every=2,
    )  # fmt: skip
    finetune(config=FinetuneConfig.from_recipe("unpadded-sliced", steps=2, **settings))
    held_out = _audio(run / HOLDOUT_MANIFEST)
    state = torch.load(latest_checkpoint(run) / STATE_FILE, weights_only=True)
    assert [row["audio"] for row in state["holdout"]] == held_out
    # The folder changes between the runs (its listing, not its size, which the sampler's position depends on):
    # a clip trained on goes, a new one comes.
    os.unlink(_audio(run / TRAIN_MANIFEST)[0])
    (folder / CLIPS[-1].name).symlink_to(CLIPS[-1])
    finetune(config=FinetuneConfig.from_recipe("unpadded-sliced", steps=3, resume="", **settings))
    assert _audio(run / HOLDOUT_MANIFEST) == held_out
    assert not set(_audio(run / TRAIN_MANIFEST)) & set(held_out)
    assert len(_audio(run / TRAIN_MANIFEST)) == len(CLIPS) - 2 - 2


def test_a_resume_whose_stored_hold_out_is_unusable_keeps_the_runs_holdout_manifest(tmp_path):
    from whisper_rope.training.loop import _kept_holdout

    clip = str(CLIPS[0])
    (tmp_path / HOLDOUT_MANIFEST).write_text(json.dumps({"audio": clip, "text": "the teacher's words"}) + "\n")
    for stored in (None, "x", [1, 2], [{"audio": clip, "start": "soon"}], [{"audio": clip, "path": "/etc"}], []):
        assert _kept_holdout({"holdout": stored}, tmp_path) == [{"audio": clip}], stored
    assert _kept_holdout({"holdout": [{"audio": clip, "end": 2.5}]}, tmp_path) == [{"audio": clip, "end": 2.5}]
    for manifest in ("{not json\n", "[1]\n"):
        (tmp_path / HOLDOUT_MANIFEST).write_text(manifest)
        assert _kept_holdout({}, tmp_path) is None  # drawn again


def test_the_final_evaluation_scores_held_out_clips_joined_into_every_length_and_one_long_recording(tmp_path):
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]
    clips = [{"audio": str(SPEECH / row["audio"]), "text": row["text"]} for row in rows * 2]  # 16 clips, ~55 s
    (tmp_path / HOLDOUT_MANIFEST).write_text("".join(json.dumps(clip) + "\n" for clip in clips))
    manifest = every_length_holdout(tmp_path / HOLDOUT_MANIFEST, tmp_path, seed=0)
    assert manifest == tmp_path / EVERY_LENGTH_MANIFEST
    written = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert written[: len(clips)] == clips  # the clips themselves first
    composed = written[len(clips) :]
    assert composed[-1]["audio"].endswith("all-clips.flac")
    everything = load_audio(composed[-1]["audio"])
    assert len(everything) / SAMPLE_RATE > 30.0  # read through the long-form paths
    assert composed[-1]["text"] == " ".join(clip["text"] for clip in clips)
    position = 0  # the recording is every clip in order, with silence between
    for clip in clips:
        audio = load_audio(clip["audio"])
        lead = int(np.flatnonzero(audio)[0])  # the clip's own leading silence
        start = position + int(np.flatnonzero(everything[position:])[0]) - lead
        gap = start - position
        assert gap == 0 if position == 0 else 0.3 * SAMPLE_RATE - 2 <= gap <= 1.0 * SAMPLE_RATE + 2
        np.testing.assert_array_equal(everything[start : start + len(audio)], audio)
        position = start + len(audio)
    lengths = [len(load_audio(row["audio"])) / SAMPLE_RATE for row in composed[:-1]]
    assert {next(i for i, (low, high) in enumerate(WINDOW_BUCKETS) if low < s <= high) for s in lengths} == {0, 1, 2}
    by_audio = {clip["audio"]: clip["text"] for clip in clips}
    for row in composed[:-1]:  # each window's reference is a run of the clips' texts joined
        assert len(row["text"].split()) > max(len(t.split()) for t in by_audio.values())
        assert set(row["text"].split()) <= {word for text in by_audio.values() for word in text.split()}
