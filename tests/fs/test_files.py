"""whisper_rope.fs.files: paths as users type them, regular files only, nothing outside a model directory."""

import os
from pathlib import Path

import pytest

from whisper_rope.errors import CheckpointError, ModelNotFoundError
from whisper_rope.fs.files import inside, is_regular, read_regular, user_path, within


def test_user_path_expands_home_and_keeps_relative_paths_relative(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path("~/a b/x.pt") == tmp_path / "a b" / "x.pt"
    assert user_path("data/x.wav") == Path("data/x.wav")
    assert user_path(Path("/abs/~x")) == Path("/abs/~x")


def test_read_regular_reads_a_file_and_refuses_a_fifo_without_blocking(tmp_path):
    (tmp_path / "a.json").write_bytes(b"{}")
    assert read_regular(tmp_path / "a.json", "config", CheckpointError) == b"{}"
    os.mkfifo(tmp_path / "fifo.json")  # no writer: a blocking open would wait forever
    with pytest.raises(CheckpointError, match=r"config '.*fifo.json' is not a regular file \(a FIFO"):
        read_regular(tmp_path / "fifo.json", "config", CheckpointError)
    assert not is_regular(tmp_path / "fifo.json") and is_regular(tmp_path / "a.json")


@pytest.mark.parametrize(
    "case, expected",
    [("missing", "does not exist"), ("directory", "is a directory, not a file"),
     ("device", "is not a regular file (a FIFO, socket or device)"), ("large", "is 11 bytes; at most 10 are read")],
)  # fmt: skip
def test_read_regular_names_the_file_and_what_is_wrong(tmp_path, case, expected):
    path = {"missing": tmp_path / "none", "directory": tmp_path, "device": Path("/dev/zero")}.get(case)
    if case == "large":
        path = tmp_path / "large"
        path.write_bytes(b"x" * 11)
    with pytest.raises(CheckpointError) as refused:
        read_regular(path, "manifest", CheckpointError, limit=10)
    assert str(refused.value) == f"manifest {str(path)!r} {expected}"


def test_read_regular_raises_the_callers_error_type_even_when_it_is_an_os_error(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ModelNotFoundError, match="is not a regular file"):  # a FileNotFoundError subclass
        read_regular(tmp_path / "fifo", "weights", ModelNotFoundError)


OUT = "is not a name inside the directory"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (tmp_path / "outside.json").write_text("{}")
    return directory


@pytest.mark.parametrize(
    "path, folder, expected",
    [("/a/b/c", "/a", True), ("/a", "/a", True), ("/ab", "/a", False), ("/a", "/a/b", False), ("a/b", "/a", False)],
)
def test_within_is_the_folder_itself_or_below_it_never_a_sibling_sharing_its_prefix(path, folder, expected):
    assert within(Path(path), Path(folder)) is expected


@pytest.mark.parametrize(
    "name, expected",
    [("../outside.json", OUT), ("sub/../../outside.json", OUT), ("/etc/passwd", OUT),
     ("", "is not a file name"), (7, "is not a file name"),
     (["a"], "is not a file name"), ("a\0b", "is not a file name"), ("none.json", "does not exist")],
)  # fmt: skip
def test_inside_refuses_names_that_leave_the_directory_or_are_no_file_name(model_dir, name, expected):
    with pytest.raises(CheckpointError) as refused:
        inside(model_dir, name, "shard", CheckpointError)
    message = str(refused.value)
    assert message.startswith(f"shard {name!r} of {str(model_dir)!r} ") and message.endswith(expected), message


def test_inside_follows_links_within_the_directory_and_refuses_links_out(model_dir):
    assert inside(model_dir, "config.json", "file", CheckpointError) == model_dir / "config.json"
    os.symlink("config.json", model_dir / "alias.json")
    assert inside(model_dir, "alias.json", "file", CheckpointError) == model_dir / "alias.json"
    os.symlink(model_dir.parent / "outside.json", model_dir / "out.json")
    with pytest.raises(CheckpointError, match="'out.json' .* leads out of the directory"):
        inside(model_dir, "out.json", "file", CheckpointError)


def test_inside_refuses_a_fifo_and_a_device_and_allows_an_optional_file_to_be_missing(model_dir):
    os.mkfifo(model_dir / "fifo.json")
    with pytest.raises(CheckpointError, match="'fifo.json' .* is not a regular file"):
        inside(model_dir, "fifo.json", "file", CheckpointError)
    os.symlink("/dev/zero", model_dir / "model.bin")
    with pytest.raises(CheckpointError, match="leads out of the directory"):
        inside(model_dir, "model.bin", "file", CheckpointError)
    assert inside(model_dir, "generation_config.json", "file", CheckpointError, required=False) is None


def test_inside_follows_a_hugging_face_cache_snapshot_into_its_blobs_only(tmp_path):
    repo = tmp_path / "models--someone--model"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text("{}")
    (tmp_path / "elsewhere").write_text("{}")
    os.symlink("../../blobs/f00d", snapshot / "config.json")
    os.symlink("../../../elsewhere", snapshot / "model.safetensors")
    assert inside(snapshot, "config.json", "file", CheckpointError) == snapshot / "config.json"
    with pytest.raises(CheckpointError, match="leads out of the directory"):
        inside(snapshot, "model.safetensors", "file", CheckpointError)


def test_read_regular_allocates_about_the_size_of_the_file_not_its_limit(tmp_path):
    import tracemalloc

    (tmp_path / "small.json").write_bytes(b"{}" * 100)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert len(read_regular(tmp_path / "small.json", "config", CheckpointError)) == 200
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4096, peak  # a read of MAX_TEXT_BYTES would reserve 256 MiB at once
