"""Hostile and malformed ``.pt`` checkpoints through `whisper_rope.load_model` and the CLI.

A pickle that would run code (a ``__reduce__`` payload writing a marker file) must be refused without running,
whatever the container (zip, legacy, bare pickle) and wherever the payload hides; wrong dims, missing or extra
tensors, wrong dtypes and truncated or foreign files must be refused with one clear line.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import traceback
import zipfile
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import whisper_rope
from tests.convert_helpers import SMALL_DIMS, random_state_dict
from whisper_rope.errors import CheckpointError, WhisperRopeError
from whisper_rope.weights.huggingface import write_huggingface
from whisper_rope.weights.loading import checkpoint_dict

from . import (
    LONG,
    REPO,
    Hang,
    address_space_cap,
    assert_clear_message,
    assert_one_line_error,
    run_cli,
    scaled,
    time_limit,
    transcribe,
)

HELLO = REPO / "tests" / "fixtures" / "hello.flac"


class ExecPayload:
    """Unpickling this runs ``exec`` of Python that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


class SystemPayload(ExecPayload):
    """Unpickling this runs ``os.system('touch marker')`` (another global: ``posix.system``)."""

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _save(obj: object, path: Path, container: str) -> Path:
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol={"pickle2": 2, "pickle5": 5}[container]))
    return path


@pytest.fixture(scope="module")
def valid_checkpoint() -> dict:
    """A small upstream-variant checkpoint dict (our format) to corrupt."""
    torch.manual_seed(0)
    return checkpoint_dict(whisper_rope.build_model(SMALL_DIMS, "whisper"))


def _placed(base: dict, payload: object, where: str) -> object:
    if where == "whole file":
        return payload
    if where == "dims":
        return {**base, "dims": payload}
    if where == "tensor":
        return {**base, "model_state_dict": {**base["model_state_dict"], "encoder.conv1.weight": payload}}
    return {**base, "rotary": {"theta": payload}}  # "rotary option"


CONTAINERS = ["zip", "legacy", "pickle2", "pickle5"]
PLACES = ["whole file", "dims", "tensor", "rotary option"]


@pytest.mark.parametrize("payload_type", [ExecPayload, SystemPayload])
@pytest.mark.parametrize("container", CONTAINERS)
def test_the_payloads_are_live_when_loaded_without_weights_only(tmp_path, valid_checkpoint, container, payload_type):
    """Positive control: each hostile file really runs its code under a plain ``torch.load``/``pickle.load``."""
    marker = tmp_path / "control-marker"
    path = _save(_placed(valid_checkpoint, payload_type(marker), "dims"), tmp_path / "control.pt", container)
    if container.startswith("pickle"):
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload_type", [ExecPayload, SystemPayload])
@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_pickle_payload_is_refused_by_load_model_and_never_runs(
    tmp_path, valid_checkpoint, container, where, payload_type
):
    marker = tmp_path / "marker"
    path = _save(_placed(valid_checkpoint, payload_type(marker), where), tmp_path / "evil.pt", container)
    with pytest.raises(CheckpointError) as refused:
        whisper_rope.load_model(path, device="cpu")
    message = assert_clear_message(refused.value)
    assert "evil.pt" in message
    if payload_type is ExecPayload and container != "pickle5":  # torch stops protocol 5 at its FRAME opcode
        assert "refusing checkpoint" in message and "Unsupported global" in message
    assert not marker.exists()


def test_a_payload_calling_os_system_is_reported_as_refused_not_as_truncated(tmp_path, valid_checkpoint):
    marker = tmp_path / "marker"
    path = _save(_placed(valid_checkpoint, SystemPayload(marker), "dims"), tmp_path / "evil.pt", "zip")
    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        whisper_rope.load_model(path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("container", CONTAINERS)
def test_a_pickle_payload_given_to_the_cli_exits_2_with_one_line_and_never_runs(
    tmp_path, capsys, valid_checkpoint, container
):
    marker = tmp_path / "marker"
    path = _save(_placed(valid_checkpoint, ExecPayload(marker), "tensor"), tmp_path / "evil.pt", container)
    assert transcribe(path, [HELLO], tmp_path / "transcripts") == 2
    assert_one_line_error(capsys.readouterr().err, "evil.pt")
    assert not marker.exists()

    assert run_cli("convert", path, tmp_path / "out") == 2
    assert_one_line_error(capsys.readouterr().err, "evil.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()


def _hugging_face_dir_with_pickle(tmp_path: Path, payload: object) -> Path:
    directory = write_huggingface(SMALL_DIMS, random_state_dict(SMALL_DIMS), tmp_path / "hf")
    (directory / "model.safetensors").unlink()
    torch.save(payload, directory / "pytorch_model.bin")
    return directory


def test_a_pickle_payload_in_a_hugging_face_pytorch_model_bin_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    directory = _hugging_face_dir_with_pickle(tmp_path, {"model.encoder.conv1.weight": ExecPayload(marker)})
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        whisper_rope.load_model(directory, device="cpu")
    assert not marker.exists()


def test_refusals_of_unsafe_pickles_are_one_sentence_everywhere(tmp_path, valid_checkpoint):
    marker = tmp_path / "marker"
    evil = _save(_placed(valid_checkpoint, ExecPayload(marker), "tensor"), tmp_path / "evil.pt", "zip")
    directory = _hugging_face_dir_with_pickle(tmp_path, {"model.encoder.conv1.weight": ExecPayload(marker)})
    from whisper_rope.weights.convert import convert

    for attempt in (lambda: convert(evil, tmp_path / "out"), lambda: whisper_rope.load_model(directory)):
        with pytest.raises(CheckpointError) as refused:
            attempt()
        message = assert_clear_message(refused.value)
        assert "\x1b[" not in message and len(message) < 400, message


def test_convert_reads_a_legacy_format_checkpoint(tmp_path, valid_checkpoint):
    from whisper_rope.weights.convert import convert

    legacy = _save(valid_checkpoint, tmp_path / "legacy.pt", "legacy")
    whisper_rope.load_model(legacy, device="cpu")  # the library reads it
    convert(legacy, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Malformed checkpoints: a table of corruptions, each refused by load_model and by the CLI


def _with_state(base: dict, **changes) -> dict:
    return {**base, "model_state_dict": {**base["model_state_dict"], **changes}}


def _without(base: dict, key: str) -> dict:
    return {**base, "model_state_dict": {k: v for k, v in base["model_state_dict"].items() if k != key}}


def _dims(base: dict, **changes) -> dict:
    return {**base, "dims": {**base["dims"], **changes}}


CONV = "encoder.conv1.weight"
MALFORMED: Dict[str, Callable[[dict], object]] = {
    "dims is not a dict": lambda b: {**b, "dims": [8, 12]},
    "dims lacks a field": lambda b: {**b, "dims": {k: v for k, v in b["dims"].items() if k != "n_vocab"}},
    "dims has an extra field": lambda b: _dims(b, n_experts=4),
    "a dim is negative": lambda b: _dims(b, n_mels=-8),
    "a dim is zero": lambda b: _dims(b, n_audio_layer=0),
    "a dim is a string": lambda b: _dims(b, n_vocab="100"),
    "a dim is a float": lambda b: _dims(b, n_vocab=100.0),
    "dims disagree with the tensors": lambda b: _dims(b, n_mels=9),
    "a tensor is missing": lambda b: _without(b, CONV),
    "an extra tensor": lambda b: _with_state(b, **{"encoder.blocks.7.attn.query.weight": torch.zeros(16, 16)}),
    "a tensor has the wrong shape": lambda b: _with_state(b, **{CONV: torch.zeros(16, 8, 4)}),
    "an integer tensor": lambda b: _with_state(b, **{CONV: torch.zeros(16, 8, 3, dtype=torch.int32)}),
    "a complex tensor": lambda b: _with_state(b, **{CONV: torch.zeros(16, 8, 3, dtype=torch.complex64)}),
    "a quantised tensor": lambda b: _with_state(
        b, **{CONV: torch.quantize_per_tensor(torch.zeros(16, 8, 3), 0.1, 0, torch.qint8)}
    ),
    "a string instead of a tensor": lambda b: _with_state(b, **{CONV: "weights"}),
    "state dict is a list": lambda b: {**b, "model_state_dict": list(b["model_state_dict"].values())},
    "no model_state_dict": lambda b: {k: v for k, v in b.items() if k != "model_state_dict"},
    "a list instead of a dict": lambda b: [b["dims"], b["model_state_dict"]],
    "a bare tensor": lambda b: torch.zeros(3),
    "an unknown variant": lambda b: {**b, "variant": "spiral/learned"},
    "a variant that is not a string": lambda b: {**b, "variant": 7},
    "rotary options that are not a dict": lambda b: {**b, "rotary": [10000.0]},
    "alignment heads of the wrong shape": lambda b: {**b, "alignment_heads": torch.ones(3, 3, dtype=torch.bool)},
}


def _write_malformed(tmp_path: Path, base: dict, case: str) -> Path:
    path = tmp_path / f"{case.replace(' ', '-')}.pt"
    torch.save(MALFORMED[case](base), path)
    return path


def _damaged_files(tmp_path: Path, base: dict) -> Dict[str, Path]:
    """Files that are not checkpoints at all, by construction rather than by pickling."""
    good = tmp_path / "good.pt"
    torch.save(base, good)
    raw = good.read_bytes()
    files = {
        "a zip cut in half": raw[: len(raw) // 2],
        "a zip cut before its central directory": raw[:-30],
        "an empty file": b"",
        "random bytes": os.urandom(4096),
        "a text file": b"model weights go here\n",
        "a JSON file": json.dumps({"dims": {}, "model_state_dict": {}}).encode(),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '-')}.pt"
        paths[name].write_bytes(content)
    other_zip = tmp_path / "a-zip-of-something-else.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    paths["a zip of something else"] = other_zip
    directory = tmp_path / "a-directory.pt"
    directory.mkdir()
    paths["a directory named .pt"] = directory
    return paths


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_is_refused_by_load_model_with_a_clear_message(tmp_path, valid_checkpoint, case):
    path = _write_malformed(tmp_path, valid_checkpoint, case)
    with pytest.raises(WhisperRopeError) as refused:
        whisper_rope.load_model(path, device="cpu")
    assert_clear_message(refused.value)


def test_damaged_and_foreign_files_are_refused_by_load_model_naming_the_file(tmp_path, valid_checkpoint):
    for name, path in _damaged_files(tmp_path, valid_checkpoint).items():
        with pytest.raises(WhisperRopeError) as refused:
            whisper_rope.load_model(path, device="cpu")
        message = assert_clear_message(refused.value)
        assert path.name in message, (name, message)


def test_every_malformed_checkpoint_given_to_the_cli_exits_2_with_one_line(tmp_path, capsys, valid_checkpoint):
    paths = {case: _write_malformed(tmp_path, valid_checkpoint, case) for case in MALFORMED}
    paths.update(_damaged_files(tmp_path, valid_checkpoint))
    for name, path in paths.items():
        assert transcribe(path, [HELLO], tmp_path / "out") == 2, name
        assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("claim", [{"n_audio_state": 4096, "n_text_state": 4096}, {"n_text_layer": 10**6}])
def test_dims_claiming_a_huge_model_are_refused_before_allocating_it(tmp_path, valid_checkpoint, claim):
    path = tmp_path / "liar.pt"
    torch.save(_dims(valid_checkpoint, **claim), path)
    with address_space_cap(512 << 20), time_limit(5):
        try:
            with pytest.raises(CheckpointError):
                whisper_rope.load_model(path, device="cpu")
        except Hang as hang:
            raise AssertionError(str(hang)) from None


@pytest.mark.parametrize("heads", ["abc", 3, b"not base85 gzip"])
def test_alignment_heads_of_the_wrong_type_are_refused(tmp_path, valid_checkpoint, heads):
    path = tmp_path / "heads.pt"
    torch.save({**valid_checkpoint, "alignment_heads": heads}, path)
    with pytest.raises(CheckpointError):
        whisper_rope.load_model(path, device="cpu")


@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_sparse_or_nested_tensors_are_refused_as_a_checkpoint_error(tmp_path, valid_checkpoint, layout):
    weight = valid_checkpoint["model_state_dict"][CONV]
    odd = weight.to_sparse() if layout == "sparse" else torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    path = tmp_path / f"{layout}.pt"
    torch.save(_with_state(valid_checkpoint, **{CONV: odd}), path)
    with pytest.raises(CheckpointError):
        whisper_rope.load_model(path, device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing our own format: truncations and bit flips of a small .pt


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, valid_checkpoint):
    """The saved file, its bytes, and the byte ranges that describe or hold tensors: the pickle (storage keys,
    offsets, shapes) and each storage record (its local zip header, which locates the data, and the data)."""
    path = tmp_path_factory.mktemp("pt") / "model.pt"
    torch.save(valid_checkpoint, path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        records = []
        for info in archive.infolist():
            if "/data/" in info.filename or info.filename.endswith("/data.pkl"):
                header = raw[info.header_offset : info.header_offset + 30]
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                records.append(
                    (info.header_offset, info.header_offset + 30 + name_length + extra_length + info.compress_size)
                )
    return path, raw, records


PT_SETTINGS = settings(
    max_examples=scaled(150, 2000),
    deadline=None,
    database=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow],
)


@PT_SETTINGS
@given(
    fraction=st.floats(0, 1, exclude_max=True),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=4),
)
def test_truncated_or_bit_flipped_checkpoints_load_their_bytes_or_are_refused(
    saved_checkpoint, valid_checkpoint, fraction, flips
):
    path, raw, records = saved_checkpoint
    truncate = not flips
    mutated = bytearray(raw[: int(fraction * len(raw))] if truncate else raw)
    for where, bit in flips:
        mutated[int(where * len(mutated))] ^= 1 << bit
    case = path.with_name("case.pt")
    case.write_bytes(bytes(mutated))
    changed = [i for i in range(len(mutated)) if mutated[i] != raw[i]] if not truncate else []
    about_tensors = any(a <= i < b for i in changed for a, b in records)
    try:
        with time_limit(10):
            model = whisper_rope.load_model(case, device="cpu")
    except WhisperRopeError as refused:
        assert_clear_message(refused)
        return
    except Exception as crash:
        if not _raised_inside_torch_load(crash):
            raise
        reject()  # pinned by test_garbage_that_crashes_the_weights_only_unpickler_is_refused
    assert not truncate, "a truncated checkpoint loaded"
    state = model.state_dict()
    original = valid_checkpoint["model_state_dict"]
    differing = [k for k in original if not torch.equal(state[k], original[k])]
    assert not differing or about_tensors, f"a change to the zip structure altered {differing[:3]}"


def _raised_inside_torch_load(error: BaseException) -> bool:
    """Whether ``error`` came out of torch.load itself: read_checkpoint lets some of those through (known bug)."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(f.filename.endswith(("torch/serialization.py", "torch/_weights_only_unpickler.py")) for f in frames)


def _with_pickle(source: Path, destination: Path, edit: Callable[[bytes], bytes]) -> Path:
    """A copy of the checkpoint ``source`` whose data.pkl is ``edit``-ed (the tensors' records unchanged)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as edited:
        for info in original.infolist():
            content = original.read(info.filename)
            edited.writestr(info.filename, edit(content) if info.filename.endswith("/data.pkl") else content)
    return destination


GARBAGE = {  # files on which torch's weights-only unpickler raises other than UnpicklingError or RuntimeError
    "IndexError": b"\x80\x02b\x85.X",
    "KeyError": b"\x80\x02hc(c",
    "struct.error": b"\x80\x02J\x85\x00",
    "TypeError": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.",
    "AttributeError": b"a storage type that is a string",
}


@pytest.mark.parametrize("crash", sorted(GARBAGE))
def test_garbage_that_crashes_the_weights_only_unpickler_is_refused(tmp_path, capsys, saved_checkpoint, crash):
    path = tmp_path / "garbage.pt"
    if crash == "AttributeError":
        _with_pickle(
            saved_checkpoint[0],
            path,
            lambda pkl: pkl.replace(b"ctorch\nFloatStorage\n", b"X\x0c\x00\x00\x00FloatStorage"),
        )
    else:
        path.write_bytes(GARBAGE[crash])
    with pytest.raises(CheckpointError):
        whisper_rope.load_model(path, device="cpu")
    assert transcribe(path, [HELLO], tmp_path / "out") == 2
    assert_one_line_error(capsys.readouterr().err, "garbage.pt")
