"""Model directories are closed.

Every file a reader opens resolves inside the model directory and is a regular file: an index naming ``../x`` or
an absolute path, a symlink leading out of the directory, a FIFO or a device in place of a file are refused with
one line naming the file; nothing makes a reader wait forever. Each case runs in a child process with a timeout,
so that a reader blocked on a FIFO fails the test instead of stopping the run.

The one layout whose links do lead out is Hugging Face's own download cache (``snapshots/REV/x`` -> ``../../blobs/
HASH``); it keeps working.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .commands import SPEECH_DIMS, command, one_error_line, peak_memory, save_model

TIMEOUT = 30


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    source = save_model(root / "toy.pt")
    done = command("convert", source, root / "model")
    assert done.returncode == 0, done.stderr
    return root / "model"


@pytest.fixture(scope="module")
def ct2_model(tmp_path_factory) -> Path:
    from tests.convert_helpers import write_model

    directory = tmp_path_factory.mktemp("ct2") / "model"
    write_model(directory, alignment_heads=[[1, 0]])
    return directory


def _load(directory: Path) -> dict:
    return peak_memory(f"whisper_rope.load_model({str(directory)!r}, device='cpu')", timeout=TIMEOUT)


def _assert_refused(outcome: dict, *fragments: str) -> str:
    assert outcome["result"] == "refused", outcome
    message = outcome["message"]
    assert "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _sharded(hf_export: Path, target: Path, shard_name: str) -> Path:
    """A copy of the export at ``target`` whose weights are listed by an index naming ``shard_name``."""
    from safetensors import safe_open

    shutil.copytree(hf_export, target)
    with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    index = {"metadata": {}, "weight_map": {name: shard_name for name in names}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


def test_a_sharded_directory_inside_its_folder_loads(tmp_path, hf_export):
    directory = _sharded(hf_export, tmp_path / "model", "model-00001-of-00001.safetensors")
    os.rename(directory / "model.safetensors", directory / "model-00001-of-00001.safetensors")
    assert _load(directory)["result"] == "ok"


def test_an_index_naming_a_file_outside_the_directory_is_refused(tmp_path, hf_export):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    directory = _sharded(hf_export, tmp_path / "deep" / "model", "../../elsewhere/weights.safetensors")
    os.rename(directory / "model.safetensors", outside / "weights.safetensors")
    _assert_refused(_load(directory), "weights.safetensors")


def test_an_index_naming_an_absolute_path_is_refused(tmp_path, hf_export):
    outside = tmp_path / "weights.safetensors"
    directory = _sharded(hf_export, tmp_path / "model", str(outside))
    os.rename(directory / "model.safetensors", outside)
    _assert_refused(_load(directory), "weights.safetensors")


def test_a_symlink_leading_out_of_the_directory_is_refused(tmp_path, hf_export):
    directory = tmp_path / "model"
    shutil.copytree(hf_export, directory)
    os.rename(directory / "model.safetensors", tmp_path / "secret.safetensors")
    os.symlink(tmp_path / "secret.safetensors", directory / "model.safetensors")
    _assert_refused(_load(directory), "model.safetensors")


@pytest.mark.parametrize("shard", [7, ["a"], "", "shards/"], ids=["a number", "a list", "empty", "a directory"])
def test_an_index_naming_something_that_is_no_file_is_refused(tmp_path, hf_export, shard):
    directory = _sharded(hf_export, tmp_path / "model", "placeholder")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: shard for name in index["weight_map"]}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "shards").mkdir()
    (directory / "model.safetensors").unlink()
    _assert_refused(_load(directory), "model.safetensors.index.json" if not isinstance(shard, str) else "shard")


def test_a_ctranslate2_part_linked_outside_the_directory_is_refused(tmp_path, ct2_model):
    directory = tmp_path / "model"
    shutil.copytree(ct2_model, directory)
    data = (directory / "model.bin").read_bytes()
    (directory / "model.bin").unlink()
    (directory / "model.bin.part1").write_bytes(data[:100])
    (tmp_path / "elsewhere").write_bytes(data[100:])
    os.symlink(tmp_path / "elsewhere", directory / "model.bin.part2")
    _assert_refused(_load(directory), "model.bin.part2")


def test_the_hugging_face_download_cache_layout_of_symlinks_into_blobs_loads(tmp_path, hf_export):
    repo = tmp_path / "models--someone--whisper-toy"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, entry in enumerate(sorted(hf_export.iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copy(entry, blob)
        os.symlink(f"../../blobs/{blob.name}", snapshot / entry.name)
    assert _load(snapshot)["result"] == "ok"


def test_a_symlinked_model_directory_loads(tmp_path, hf_export):
    os.symlink(hf_export, tmp_path / "link")
    assert _load(tmp_path / "link")["result"] == "ok"


@pytest.mark.parametrize("name", ["generation_config.json", "model.safetensors"])
def test_a_fifo_in_a_hugging_face_directory_never_blocks_the_reader(tmp_path, hf_export, name):
    directory = tmp_path / "model"
    shutil.copytree(hf_export, directory)
    (directory / name).unlink()
    os.mkfifo(directory / name)
    outcome = _load(directory)  # a FIFO is no file of the model: skipped (optional files) or refused
    assert outcome["result"] in ("ok", "refused"), outcome


def test_a_fifo_in_a_ctranslate2_directory_is_refused_without_blocking(tmp_path, ct2_model):
    directory = tmp_path / "model"
    shutil.copytree(ct2_model, directory)
    (directory / "config.json").unlink()
    os.mkfifo(directory / "config.json")
    outcome = peak_memory(f"""
        from whisper_rope.cli import main
        main(["convert", {str(directory)!r}, {str(tmp_path / 'out.pt')!r}])
    """, timeout=TIMEOUT)  # fmt: skip
    assert outcome["result"] == "exit" and outcome["code"] == 2, outcome
    assert not (tmp_path / "out.pt").exists()


def test_a_ctranslate2_config_linked_outside_the_directory_is_refused(tmp_path, ct2_model):
    directory = tmp_path / "model"
    shutil.copytree(ct2_model, directory)
    os.rename(directory / "config.json", tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", directory / "config.json")
    _assert_refused(_load(directory), "config.json")


def test_a_device_in_place_of_model_bin_is_refused(tmp_path, ct2_model):
    directory = tmp_path / "model"
    shutil.copytree(ct2_model, directory)
    (directory / "model.bin").unlink()
    os.symlink("/dev/zero", directory / "model.bin")
    _assert_refused(_load(directory), "model.bin")


def test_a_fifo_given_as_a_manifest_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    model = save_model(tmp_path / "speech.pt", dims=SPEECH_DIMS)
    done = command("finetune", "--model", model, "--train", fifo, "--output", tmp_path / "out", "--steps", "1",
                   timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "train.jsonl")
