"""A teacher cache cannot poison a run: what `TeacherCache.fill` reads is checked before use.

An entry that parses but holds another clip's states, ids outside the vocabulary, NaN, the wrong dtype or an edited
transcript is recomputed with one warning naming it; a cache directory that is a link, read-only or full is not
written to: the run computes its targets without caching them, with one warning.
"""

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from whisper_rope import build_model
from whisper_rope.data import load_examples
from whisper_rope.training import teacher_cache as teacher_cache_module
from whisper_rope.training.teacher_cache import RECORD, TargetSpec, TeacherCache, TeacherTargetsDataset

from ..conftest import FIXTURES, randomise_, small_dims

SPEECH = FIXTURES / "speech"
KINDS = ("decoder_layers", "encoder_output")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return randomise_(build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher):
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()][:2]
    manifest = tmp_path_factory.mktemp("data") / "clips.jsonl"
    manifest.write_text(
        "".join(json.dumps({"audio": str(SPEECH / r["audio"]), "text": r["text"]}) + "\n" for r in rows)
    )
    return load_examples(manifest, teacher, pad_30s=False, teacher_30s=True)


def _fill(cache: TeacherCache, dataset) -> list:
    """Fill one clip per teacher batch, so that a recomputed entry is bitwise the first (batching changes rounding)."""
    return cache.fill(dataset, torch.device("cpu"), batch_size=1, progress=False)


def _rewrite(path: Path, change) -> None:
    """Rewrite the entry at ``path`` as a valid safetensors file, its tensors and metadata passed through
    ``change(tensors, metadata)``."""
    with safe_open(str(path), framework="pt") as entry:
        tensors = {key: entry.get_tensor(key) for key in entry.keys()}
        metadata = entry.metadata() or {}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def _contents(path: Path) -> tuple:
    """(metadata, {key: tensor}) of an entry, to compare entries by value (their headers' key order may differ)."""
    with safe_open(str(path), framework="pt") as entry:
        return entry.metadata(), {key: entry.get_tensor(key).clone() for key in sorted(entry.keys())}


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _set(key, value):
    def change(tensors, metadata):
        tensors[key] = value(tensors[key])

    return change


DAMAGE = {
    "wrong shape": _set("decoder_layers", lambda v: v[:, :, :7].contiguous()),
    "wrong dtype": _set("encoder_output", lambda v: v.float()),
    "token id past the vocabulary": _set("text_tokens", lambda v: torch.cat([v[:-1], torch.tensor([10**9])])),
    "negative token id": _set("text_tokens", lambda v: torch.cat([v[:-1], torch.tensor([-3])])),
    "nan state": _set("decoder_layers", lambda v: v.index_fill(1, torch.tensor([0]), float("nan"))),
    "shortened transcript": _set("text_tokens", lambda v: v[:-1].contiguous()),
    "edited transcript": _set("text_tokens", lambda v: torch.cat([v[:-1], v[:1]])),
    "recorded for another clip": lambda tensors, metadata: metadata.update({RECORD: json.dumps({"entry": "0" * 64})}),
    "no record (older format)": lambda tensors, metadata: metadata.clear(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_entry_that_parses_but_does_not_fit_is_recomputed_with_one_warning(
    tmp_path, teacher, dataset, caplog, damage
):
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=KINDS))
    first, second = _fill(cache, dataset)
    good = _contents(first)
    _rewrite(first, DAMAGE[damage])
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        again = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=KINDS))
        assert _fill(again, dataset) == [first, second]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(first) in warnings[0] and "recomputing" in warnings[0], warnings
    assert again.computed == 1
    assert _same(_contents(first), good)  # the recomputed entry is the teacher's, bit for bit


def test_a_foreign_entry_copied_to_a_clips_name_is_recomputed(tmp_path, teacher, dataset, caplog):
    """Another clip's entry is a sound file with sound shapes where the clips' lengths agree: only its record of
    the name it was written for tells it apart."""
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=KINDS))
    first, second = _fill(cache, dataset)
    good = _contents(first)
    shutil.copyfile(second, first)
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        _fill(cache, dataset)
    assert cache.computed == 1 and "another clip" in caplog.text and _same(_contents(first), good)


def _unwritable(root: Path, error_number: int):
    """`atomic_write` failing with ``error_number`` under ``root`` (a read-only or full file system there)."""
    atomic_write = teacher_cache_module.atomic_write

    def write(path, writer):
        if Path(path).is_relative_to(root):
            raise OSError(error_number, f"cannot write {path}: {errno.errorcode[error_number]}")
        return atomic_write(path, writer)

    return write


@pytest.mark.parametrize("problem", ["symlink", "read-only", "full"])
def test_an_unusable_cache_directory_degrades_to_computing_without_caching(
    tmp_path, teacher, dataset, caplog, monkeypatch, problem
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "cache"
    if problem == "symlink":
        root.symlink_to(elsewhere, target_is_directory=True)
    else:
        monkeypatch.setattr(
            teacher_cache_module,
            "atomic_write",
            _unwritable(root, errno.EROFS if problem == "read-only" else errno.ENOSPC),
        )
    cache = TeacherCache(root, teacher, TargetSpec(kinds=KINDS))
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        entries = _fill(cache, dataset)
        monkeypatch.undo()
        assert _fill(cache, dataset) == entries and cache.computed == 0  # the run reads what it computed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache.directory) in warnings[0] and "without caching" in warnings[0], warnings
    assert not any(elsewhere.iterdir()), "nothing is written through the link"
    assert all(cache.read(entry) is not None for entry in entries)  # as the hold-out's references read them
    items = TeacherTargetsDataset(dataset, entries, "reference", KINDS)
    for index in range(len(dataset)):
        states = items[index].teacher_states
        assert states["decoder_layers"].shape[:2] == (teacher.dims.n_text_layer + 1, len(dataset[index].tokens))


def test_entries_planted_behind_a_linked_cache_directory_are_not_read(tmp_path, teacher, dataset, caplog):
    """A link at the cache directory chooses what a run would train on: its entries are not read either."""
    real = tmp_path / "real"
    planted = TeacherCache(real, teacher, TargetSpec(kinds=KINDS))
    paths = _fill(planted, dataset)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = {path: path.read_bytes() for path in paths}
    cache = TeacherCache(link, teacher, TargetSpec(kinds=KINDS))
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        entries = _fill(cache, dataset)
    assert cache.computed == 2 and all(not str(e).startswith(str(link)) for e in entries)
    assert {path: path.read_bytes() for path in paths} == before


def test_a_label_free_entry_with_ids_past_the_vocabulary_is_recomputed_not_decoded(tmp_path, teacher, dataset, caplog):
    """The teacher's own transcript is the target of a label-free run: an id past the vocabulary was a tiktoken
    OverflowError when the transcript was decoded, and a wrong target when it was not."""
    spec = TargetSpec(kinds=KINDS, transcripts="teacher")
    first, _ = _fill(TeacherCache(tmp_path / "cache", teacher, spec), dataset)
    good = _contents(first)
    _rewrite(first, DAMAGE["token id past the vocabulary"])
    cache = TeacherCache(tmp_path / "cache", teacher, spec)
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        entries = _fill(cache, dataset)
    assert cache.computed == 1 and "outside the vocabulary" in caplog.text and _same(_contents(first), good)
    text = TeacherTargetsDataset(dataset, entries, "teacher", KINDS)[0].tokens
    assert int(text.max()) < teacher.dims.n_vocab and dataset.tokenizer(0).decode(text.tolist())
