"""The teacher target cache (whisper_rope.training.teacher_cache): exact targets, invalidation, healing, batches."""

import json
import logging
from pathlib import Path

import pytest
import torch

from whisper_rope import build_model
from whisper_rope.data import Collator, load_examples, target_sequence
from whisper_rope.features import real_frame_counts
from whisper_rope.training.losses import StateRecorder, recorded_modules, stacked_states
from whisper_rope.training.teacher_cache import (
    TargetSpec,
    TeacherCache,
    TeacherTargetsCollator,
    TeacherTargetsDataset,
    teacher_fingerprint,
)

from ..conftest import FIXTURES, randomise_, small_dims

SPEECH = FIXTURES / "speech"
KINDS = ("decoder_layers", "encoder_output", "encoder_layers")


@pytest.fixture
def teacher():
    return randomise_(build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05).eval()


def _manifest(tmp_path: Path, n: int = 3) -> Path:
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()][:n]
    path = tmp_path / "clips.jsonl"
    path.write_text("".join(json.dumps({"audio": str(SPEECH / r["audio"]), "text": r["text"]}) + "\n" for r in rows))
    return path


def _dataset(manifest, teacher, require_text=True):
    return load_examples(manifest, teacher, pad_30s=False, teacher_30s=True, require_text=require_text)


@torch.no_grad()
def test_entries_hold_bitwise_the_teachers_states_on_the_clip(tmp_path, teacher):
    dataset = _dataset(_manifest(tmp_path), teacher)
    # One clip per teacher batch, like the direct computation below (batching changes float rounding).
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=KINDS, transcripts="reference"))
    entries = cache.fill(dataset, torch.device("cpu"), batch_size=1, progress=False)
    assert cache.computed == len(dataset) == 3
    batched = TeacherCache(tmp_path / "batched", teacher, TargetSpec(kinds=KINDS, transcripts="reference"))
    batched_entries = batched.fill(dataset, torch.device("cpu"), batch_size=3, progress=False)
    for index, path in enumerate(entries):
        item = dataset[index]
        with StateRecorder(recorded_modules(teacher, KINDS)) as recorder:
            audio = teacher.encoder(item.teacher_mel[None])
            teacher.decoder(item.tokens[None], audio)
        direct = stacked_states(recorder, audio)
        entry = cache.read(path)
        positions = (int(real_frame_counts(item.teacher_mel)) + 1) // 2
        assert positions == item.frames // 2  # what the unpadded student encodes
        assert torch.equal(entry["encoder_output"], direct["encoder_output"][0, :positions].half())
        assert torch.equal(entry["encoder_layers"], direct["encoder_layers"][:, 0, :positions].half())
        assert torch.equal(entry["decoder_layers"], direct["decoder_layers"][:, 0].half())
        tokens, _ = target_sequence(dataset.tokenizer(index), entry["text_tokens"].tolist(), dataset.prompts[index])
        assert tokens == item.tokens.tolist()
        for key, value in batched.read(batched_entries[index]).items():
            torch.testing.assert_close(value.float(), entry[key].float(), atol=2e-3, rtol=2e-3)


def test_a_second_fill_reads_and_any_change_invalidates(tmp_path, teacher):
    dataset = _dataset(_manifest(tmp_path, 2), teacher)
    spec = TargetSpec(kinds=("decoder_layers",), transcripts="reference")
    first = TeacherCache(tmp_path / "cache", teacher, spec)
    paths = first.fill(dataset, torch.device("cpu"), progress=False)
    again = TeacherCache(tmp_path / "cache", teacher, spec)
    assert again.fill(dataset, torch.device("cpu"), progress=False) == paths and again.computed == 0
    # Decoder states do not depend on the student's margin: a run with another margin reads the same entries.
    margin = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=("decoder_layers",), margin=4))
    assert margin.fill(dataset, torch.device("cpu"), progress=False) == paths and margin.computed == 0
    assert margin.spec.margin == 0
    changed = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=("encoder_output",), margin=4))
    assert set(changed.fill(dataset, torch.device("cpu"), progress=False)).isdisjoint(paths)
    # A run that needs another kind completes the same entries, keeping what they held.
    more = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=("encoder_output",), transcripts="reference"))
    assert more.fill(dataset, torch.device("cpu"), progress=False) == paths and more.computed == 2
    assert {"decoder_layers", "encoder_output"} <= set(more.read(paths[0]))
    assert again.fill(dataset, torch.device("cpu"), progress=False) == paths and again.computed == 0
    fingerprint = teacher_fingerprint(teacher)
    with torch.no_grad():
        teacher.decoder.ln.bias[0] += 1e-3
    assert teacher_fingerprint(teacher) != fingerprint
    moved = TeacherCache(tmp_path / "cache", teacher, spec)
    assert set(moved.fill(dataset, torch.device("cpu"), progress=False)).isdisjoint(paths) and moved.computed == 2
    other_text = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in _manifest(tmp_path, 2).read_text().splitlines()]
    other_text.write_text("".join(json.dumps({**r, "text": r["text"] + " Again."}) + "\n" for r in rows))
    retold = moved.fill(_dataset(other_text, teacher), torch.device("cpu"), progress=False)
    assert moved.computed == 2 and set(retold).isdisjoint(moved.fill(dataset, torch.device("cpu"), progress=False))


def test_a_damaged_entry_is_recomputed_with_a_warning(tmp_path, teacher, caplog):
    dataset = _dataset(_manifest(tmp_path, 1), teacher)
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec())
    [path] = cache.fill(dataset, torch.device("cpu"), progress=False)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        assert cache.fill(dataset, torch.device("cpu"), progress=False) == [path]
    assert cache.computed == 1 and "cannot be read" in caplog.text
    assert path.read_bytes() == good


def test_label_free_items_carry_the_teachers_transcript_and_padded_states(tmp_path, teacher):
    dataset = _dataset(_manifest(tmp_path, 3), teacher, require_text=False)
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=KINDS, transcripts="teacher"))
    entries = cache.fill(dataset, torch.device("cpu"), batch_size=3, progress=False)
    wrapped = TeacherTargetsDataset(dataset, entries, "teacher")
    items = [wrapped[i] for i in range(3)]
    for item in items:
        text = cache.read(entries[item.index])["text_tokens"].tolist()
        expected, _ = target_sequence(dataset.tokenizer(item.index), text, dataset.prompts[item.index])
        assert item.tokens.tolist() == expected
    batch = TeacherTargetsCollator(Collator(dataset.tokenizer(0).eot, padded_30s=False))(items)
    n_tokens, n_positions = batch.tokens.shape[1], batch.mel.shape[-1] // 2
    assert batch.teacher_states["decoder_layers"].shape == (3, 3, n_tokens, 64)
    assert batch.teacher_states["encoder_output"].shape == (3, n_positions, 64)
    assert batch.teacher_positions.tolist() == [(int(f) + 1) // 2 for f in batch.frames]
    assert batch.tokens_mask().sum(dim=1).tolist() == [len(item.tokens) for item in items]
    for row in range(len(items)):  # zeros after each clip's own positions
        assert not batch.teacher_states["encoder_output"][row, batch.teacher_positions[row] :].any()


def test_a_batch_of_entries_holding_different_kinds_carries_only_the_kinds_asked_for(tmp_path, teacher):
    """An earlier run with more kinds leaves entries holding their union; a later run fills the rest with fewer:
    every item must still carry the same keys, or the collator cannot stack them."""
    dataset = _dataset(_manifest(tmp_path, 3), teacher, require_text=False)
    rich = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=KINDS, transcripts="teacher"))
    rich.fill(dataset, torch.device("cpu"), indices=[0, 1], progress=False)
    lean = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=("decoder_layers",), transcripts="teacher"))
    entries = lean.fill(dataset, torch.device("cpu"), progress=False)
    assert lean.computed == 1 and set(lean.read(entries[0])) > set(lean.read(entries[2]))
    wrapped = TeacherTargetsDataset(dataset, entries, "teacher", lean.spec.kinds)
    items = [wrapped[i] for i in range(3)]
    assert all(set(item.teacher_states) == {"decoder_layers"} for item in items)
    batch = TeacherTargetsCollator(Collator(dataset.tokenizer(0).eot, padded_30s=False))(items)
    assert set(batch.teacher_states) == {"decoder_layers"} and batch.teacher_states["decoder_layers"].shape[0] == 3
