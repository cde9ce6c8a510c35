"""Concurrent writers and readers of the same files: installed-model conversion and checkpoint saves.

Two processes resolving the same installed model at once must both succeed and leave exactly one complete cache
file (no temporary files); a reader polling the cache never sees a partial file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import whisper_rope
from tests.convert_helpers import SMALL_DIMS
from whisper_rope.weights.format import read_checkpoint
from whisper_rope.weights.packages import installed_model_names

from . import subprocess_env

CONVERT_SCRIPT = """
import sys, time
from pathlib import Path
from whisper_rope.weights import packages

cache, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():  # start converting together with the other process
    time.sleep(0.001)
print(packages.cached_conversion(name, cache_dir=cache, progress=False), flush=True)
"""


class CachePoller(threading.Thread):
    """Reads every version of every file that appears in ``directory`` as soon as it appears."""

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        self.directory = directory
        self.stop = threading.Event()
        self.seen = {}  # (name, inode) -> size read
        self.failures = []

    def run(self) -> None:
        while not self.stop.is_set():
            for path in list(self.directory.iterdir()) if self.directory.is_dir() else []:
                try:
                    with open(path, "rb") as handle:
                        key = (path.name, os.fstat(handle.fileno()).st_ino)
                        if key in self.seen:
                            continue
                        data = handle.read()  # the open handle pins this version even if it is replaced
                except FileNotFoundError:
                    continue  # a temporary file renamed or removed between listing and opening
                self.seen[key] = len(data)
                if path.suffix == ".pt":
                    try:
                        read_checkpoint(data, name=path.name)
                    except Exception as error:  # recorded: the test fails on any, naming it
                        self.failures.append(f"{path.name} ({len(data)} bytes): {error}")
                elif path.suffix == ".json":
                    try:
                        json.loads(data)
                    except ValueError as error:
                        self.failures.append(f"{path.name}: {error}")
            time.sleep(0.002)


@pytest.mark.skipif("tiny.en" not in installed_model_names(), reason="the tiny.en model package is not installed")
def test_two_processes_converting_the_same_installed_model_leave_one_complete_cache_file(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT_SCRIPT, str(cache), "tiny.en", str(go)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    poller = CachePoller(cache)
    poller.start()
    go.touch()
    outputs = [child.communicate(timeout=300) for child in children]
    poller.stop.set()
    poller.join()
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    final = Path(paths.pop())
    assert sorted(p.name for p in cache.iterdir()) == sorted([final.name, "source-hashes.json"])
    whisper_rope.load_model(final, device="cpu")
    versions = [size for (name, _), size in poller.seen.items() if name == final.name]
    print(
        f"robustness: concurrent conversion: 2 processes, {len(versions)} version(s) of {final.name} seen by the "
        f"poller, all {final.stat().st_size} bytes; temporary files seen in passing: "
        f"{sum(1 for name, _ in poller.seen if name.endswith('.tmp'))}"
    )
    assert versions and all(size == final.stat().st_size for size in versions)
    assert not poller.failures, poller.failures


def test_a_reader_never_sees_a_partial_checkpoint_while_two_threads_save_to_the_same_path(tmp_path):
    torch.manual_seed(0)
    models = [whisper_rope.build_model(SMALL_DIMS, "whisper") for _ in range(2)]
    expected = [m.state_dict()["encoder.conv1.weight"] for m in models]
    path = tmp_path / "shared.pt"
    whisper_rope.save_checkpoint(models[0], path)
    done = threading.Event()
    reads, failures = [], []

    def write(model) -> None:
        for _ in range(15):
            whisper_rope.save_checkpoint(model, path)

    def read() -> None:
        while not done.is_set():
            try:
                weight = read_checkpoint(path.read_bytes(), name=path.name)["model_state_dict"]["encoder.conv1.weight"]
            except Exception as error:  # recorded: the test fails on any, naming it
                failures.append(str(error))
                continue
            reads.append(any(torch.equal(weight, e) for e in expected))

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(m,)) for m in models]
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    done.set()
    reader.join()
    print(f"robustness: concurrent saves: 2 threads x 15 saves to one path, {len(reads)} reads, all complete")
    assert not failures, failures[:3]
    assert reads and all(reads)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.pt"]
