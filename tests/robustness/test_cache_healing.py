"""Caches heal.

A derived file in whisper_rope's cache (the installed tiny.en converted to a ``.pt``) that fails to read is
rebuilt from its source with a warning, instead of failing every run until someone deletes it by hand.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch

import whisper_rope


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory of our own, and tiny.en converted into it once."""
    monkeypatch.setenv("WHISPER_ROPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no upstream download cache either
    whisper_rope.load_model("tiny.en", device="cpu")
    return tmp_path / "cache"


DAMAGES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 3]),
    "empty": lambda path: path.write_bytes(b""),
    "random bytes": lambda path: path.write_bytes(bytes(range(256)) * 64),
    "another checkpoint": lambda path: torch.save({"dims": {}, "model_state_dict": {}}, path),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_converted_model_in_the_cache_is_rebuilt_with_a_warning(cache, caplog, damage):
    converted = [p for p in cache.iterdir() if p.suffix == ".pt"]
    assert len(converted) == 1, converted
    reference = whisper_rope.load_model("tiny.en", device="cpu").state_dict()
    DAMAGES[damage](converted[0])
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        model = whisper_rope.load_model("tiny.en", device="cpu")
    assert any(converted[0].name in r.getMessage() and "rebuil" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert [p.name for p in cache.iterdir() if p.suffix == ".pt"] == [converted[0].name]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_hash_index_is_rebuilt_silently(cache):
    (cache / "source-hashes.json").write_text("{not json")
    whisper_rope.load_model("tiny.en", device="cpu")
    assert (cache / "source-hashes.json").read_text().startswith("{\n")


#: Errors of the machine, not of the file: running out of memory, threads or file descriptors while the cached
#: conversion is read (``--threads 100000`` once made torch.load fail so, and the intact cache was rebuilt).
RESOURCE_ERRORS = {
    "MemoryError": MemoryError(),
    "torch's allocator": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
        "1048576 bytes."
    ),
    "torch's allocator (can't allocate)": RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576 bytes. Error code 12 (Cannot "
        "allocate memory)"
    ),
    "a thread pool that cannot start": RuntimeError("pthread_create failed: Resource temporarily unavailable"),
    "too many open files": OSError(errno.EMFILE, "Too many open files"),
}


@pytest.mark.parametrize("error", list(RESOURCE_ERRORS))
def test_running_out_of_resources_is_not_reported_as_a_damaged_cache_nor_rewrites_it(cache, monkeypatch, caplog, error):
    (converted,) = [p for p in cache.iterdir() if p.suffix == ".pt"]
    before = converted.stat()
    content = converted.read_bytes()

    def out_of_memory(*args, **kwargs):
        raise RESOURCE_ERRORS[error]

    monkeypatch.setattr(torch, "load", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="whisper_rope"), pytest.raises(MemoryError) as raised:
        whisper_rope.load_model("tiny.en", device="cpu")
    message = f"{raised.value}".lower()
    assert "memory" in message, message
    for claim in ("truncated", "not a pytorch file", "damaged", "cannot be read"):
        assert claim not in message, message
    assert not [r.getMessage() for r in caplog.records if "rebuil" in r.getMessage()]
    after = converted.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert converted.read_bytes() == content


@pytest.mark.parametrize("error", [MemoryError(), MemoryError("out of memory while reading checkpoint 'x.pt'")])
def test_running_out_of_memory_ends_a_command_in_one_line_with_status_1(capsys, error):
    from whisper_rope.cli.runtime import run_command

    def command() -> int:
        raise error

    assert run_command(command) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("whisper-rope: error: ") and "memory" in lines[0], lines
