"""Importer fuzzing: truncated, bit-flipped and lying CTranslate2 ``model.bin`` files and Hugging Face directories.

The oracle for every case:

* the importer raises `CheckpointError` with a one-line message, or
* it returns exactly the original tensors, dims and alignment heads, or
* the mutation touched only what one tensor's bytes or its own header entry say (payload bytes, its dtype, shape,
  size or offsets; neither format has a checksum), and the result differs from the original only in the tensors
  those bytes feed;

never another exception type, never more than `CASE_SECONDS`, never a peak allocation (``tracemalloc`` peak, and
resident-set growth) above `allowance` of the file size, and never a lazily reserved giant buffer (the address
space is capped at `ADDRESS_SPACE_HEADROOM` above the start while fuzzing).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.convert_helpers import DTYPE_IDS, SMALL_DIMS, Layout, random_state_dict, write_model
from whisper_rope.errors import CheckpointError
from whisper_rope.weights.ctranslate2 import read_ctranslate2
from whisper_rope.weights.huggingface import hf_name, read_huggingface, write_huggingface

from . import LONG, Hang, PeakMemory, address_space_cap, assert_clear_message, scaled, time_limit

#: Wall-clock limit of one import; a valid small file takes about 3 ms (CTranslate2) or 12 ms (Hugging Face).
CASE_SECONDS = 5.0
#: While fuzzing, the process may map at most this much more address space than it had at the start.
ADDRESS_SPACE_HEADROOM = 1 << 30
EXAMPLES = scaled(ci=250, long=5000)
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG,  # CI replays the same cases; the long run explores new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
HEADS = torch.tensor([[False, False], [True, False]])


def allowance(file_size: int) -> int:
    """The most one import may allocate: float32 output of a float16/int8 file is up to 4x its size, plus the
    index and one tensor in flight, plus a constant for Python's own bookkeeping."""
    return 8 * file_size + (16 << 20)


@dataclass
class Result:
    """What an import gave: upstream-named tensors, dims and alignment heads."""

    state_dict: Dict[str, torch.Tensor]
    dims: Dict[str, int]
    heads: Optional[torch.Tensor]


@dataclass
class Tally:
    """Outcomes of one fuzz target, for the summary line (docs/reliability.md)."""

    name: str
    outcomes: Counter = field(default_factory=Counter)
    size: int = 0  # bytes of the largest unmodified file (set)
    slowest: float = 0.0
    worst_traced: int = 0  # bytes
    worst_resident: int = 0

    def summary(self) -> str:
        total = sum(self.outcomes.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        mib = 1 << 20
        return (
            f"robustness: {self.name}: {total} cases ({parts}); slowest {self.slowest * 1000:.0f} ms; largest "
            f"tracemalloc peak {self.worst_traced / mib:.2f} MiB, resident growth {self.worst_resident / mib:.2f} "
            f"MiB (file {self.size / 1024:.0f} KiB, allowance {allowance(self.size) / mib:.1f} MiB)"
        )


def run_case(
    read: Callable[[], Result],
    base: Result,
    size: int,
    allowed: Set[str],
    tally: Tally,
    must_fail: bool = False,
    compare_heads: bool = True,
    free_dims: Iterable[str] = (),
) -> None:
    """Import once and check the oracle. ``allowed``: the tensors fed by changed payload bytes or by a changed
    header entry of their own, which may differ; everything else must come out exactly as from the original.
    ``free_dims``: dims that only the changed metadata states (head counts), so any valid value may come back."""
    started = time.perf_counter()
    error: Optional[Exception] = None
    result: Optional[Result] = None
    with time_limit(CASE_SECONDS), PeakMemory() as peak:
        try:
            result = read()
        except Exception as caught:  # the oracle below decides which types are acceptable
            error = caught
    elapsed = time.perf_counter() - started
    tally.size = max(tally.size, size)
    tally.slowest = max(tally.slowest, elapsed)
    tally.worst_traced = max(tally.worst_traced, peak.traced)
    tally.worst_resident = max(tally.worst_resident, peak.resident)
    assert peak.traced <= allowance(size), f"tracemalloc peak {peak.traced} bytes for a {size}-byte file"
    assert peak.resident <= allowance(size), f"resident set grew {peak.resident} bytes for a {size}-byte file"
    if error is not None:
        if not isinstance(error, CheckpointError):
            raise AssertionError(f"{type(error).__name__} instead of CheckpointError: {error}") from error
        assert_clear_message(error)
        tally.outcomes["refused"] += 1
        return
    assert not must_fail, "the importer accepted a file it must refuse"
    fixed = set(base.dims) - set(free_dims)
    assert {k: result.dims[k] for k in fixed} == {k: base.dims[k] for k in fixed}, (result.dims, base.dims)
    for head_count in set(free_dims):  # a head count may change, but only to one that splits the width evenly
        assert base.dims["n_audio_state"] % result.dims[head_count] == 0, result.dims
    assert result.state_dict.keys() == base.state_dict.keys()
    differing = {k for k, v in result.state_dict.items() if not torch.equal(v, base.state_dict[k])}
    if compare_heads and "n_text_head" not in free_dims:  # the mask's shape follows the head count
        assert (result.heads is None) == (base.heads is None) and (
            result.heads is None or torch.equal(result.heads, base.heads)
        )
    if not differing:
        tally.outcomes["identical"] += 1
        return
    assert differing <= allowed, f"{sorted(differing - allowed)[:3]} changed; only {sorted(allowed)[:3]} may"
    tally.outcomes["payload changed"] += 1


# ----------------------------------------------------------------------------------------------------------------
# CTranslate2


@dataclass(repr=False)
class Ct2Base:
    """A small valid model.bin, its header layout, the original import and what each variable feeds."""

    mode: str
    data: bytes
    layout: Layout
    base: Result
    directory: Path
    owner: Dict[int, str]  # byte offset -> variable whose payload or header record holds it
    feeds: Dict[str, Set[str]]  # variable -> upstream tensors that change when its bytes change
    header_offsets: List[int]
    fields: List[Tuple[int, int, str]]  # (offset, width in bytes, description) of every numeric header field

    def _repr_pretty_(self, printer, cycle) -> None:  # keeps hypothesis's falsifying-example report short
        printer.text(f"<{self.mode} model.bin, {len(self.data)} bytes>")


def _ct2_read(directory: Path, parts: Optional[List[Path]] = None) -> Result:
    imported = read_ctranslate2(directory, parts=parts)
    return Result(imported.state_dict, imported.dims, imported.alignment_heads)


def _variable_records(data: bytes, layout: Layout) -> Dict[str, Tuple[int, int]]:
    """variable -> (first byte of its rank field, end of its payload)."""
    records = {}
    for name, start in layout.rank.items():
        end = layout.data[name] + struct.unpack_from("<I", data, layout.nbytes[name])[0]
        records[name] = (start, end)
    return records


def _build_ct2_base(root: Path, mode: str) -> Ct2Base:
    directory = root / f"ct2-{mode}"
    _, layout, data = write_model(directory, mode=mode)
    base = _ct2_read(directory)
    records = _variable_records(data, layout)
    owner = {offset: name for name, (start, end) in records.items() for offset in range(start, end)}
    header_offsets = [i for i in range(len(data)) if i not in owner or i < layout.data[owner[i]]]
    fields = [
        (0, 4, "binary version"),
        (layout.variable_count, 4, "variable count"),
        (layout.alias_count, 4, "alias count"),
    ]
    for name in layout.rank:
        rank = data[layout.rank[name]]
        fields.append((layout.rank[name], 1, f"rank of {name}"))
        fields += [(layout.rank[name] + 1 + 4 * d, 4, f"dim {d} of {name}") for d in range(rank)]
        fields.append((layout.dtype[name], 1, f"dtype of {name}"))
        fields.append((layout.nbytes[name], 4, f"byte count of {name}"))
        fields.append((layout.rank[name] - len(name.encode()) - 3, 2, f"name length of {name}"))
    # What each variable feeds: change every payload byte and see which upstream tensors move.
    feeds: Dict[str, Set[str]] = {}
    probe = root / f"ct2-{mode}-probe"
    shutil.copytree(directory, probe)
    for name, (_, end) in records.items():
        payload = layout.data[name]
        mutated = bytearray(data)
        # Flip the lowest bit of every byte: every element changes, and no float becomes NaN or infinite (those are
        # refused, which would hide what the payload feeds).
        mutated[payload:end] = bytes(b ^ 0x01 for b in mutated[payload:end])
        (probe / "model.bin").write_bytes(bytes(mutated))
        try:
            result = _ct2_read(probe)
        except CheckpointError:
            feeds[name] = set()  # metadata whose value is checked (head counts, activation ...)
            continue
        feeds[name] = {k for k, v in result.state_dict.items() if not torch.equal(v, base.state_dict[k])}
    shutil.rmtree(probe)
    return Ct2Base(mode, data, layout, base, directory, owner, feeds, header_offsets, fields)


@pytest.fixture(scope="module")
def ct2_models(tmp_path_factory) -> Dict[str, Ct2Base]:
    root = tmp_path_factory.mktemp("ct2")
    return {mode: _build_ct2_base(root, mode) for mode in ("float32", "float16", "int8")}


@pytest.fixture(scope="module")
def fuzzing_limits():
    """Cap the address space while fuzzing; afterwards print what the fuzzers saw (``pytest -s``), the lines
    docs/reliability.md quotes."""
    with address_space_cap(ADDRESS_SPACE_HEADROOM):
        yield
    for tally in TALLIES.values():
        print(tally.summary())


def _allowed_ct2(model: Ct2Base, changed: Iterable[int]) -> Set[str]:
    """Tensors a change at these original offsets may alter: those fed by a changed variable record (rank, dims,
    dtype, byte count, payload). The file header, names, string lengths and the alias table feed nothing."""
    return set().union(*(model.feeds[model.owner[i]] for i in changed if i in model.owner))


def _case_dir(model: Ct2Base, tag: str) -> Path:
    directory = model.directory.parent / f"{model.directory.name}-{tag}"
    if not directory.exists():
        shutil.copytree(model.directory, directory)
    return directory


TALLIES: Dict[str, Tally] = {}


def _tally(name: str) -> Tally:
    return TALLIES.setdefault(name, Tally(name))


MODES = st.sampled_from(["float32", "float16", "int8"])


@FUZZ_SETTINGS
@given(mode=MODES, fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_ctranslate2_files_are_refused(ct2_models, fuzzing_limits, mode, fraction):
    model = ct2_models[mode]
    cut = int(fraction * len(model.data))
    directory = _case_dir(model, "truncated")
    (directory / "model.bin").write_bytes(model.data[:cut])
    run_case(
        lambda: _ct2_read(directory),
        model.base,
        len(model.data),
        set(),
        _tally("CTranslate2 truncation"),
        must_fail=True,
    )


@FUZZ_SETTINGS
@given(mode=MODES, data=st.data())
def test_bit_flipped_ctranslate2_files_load_the_original_or_are_refused(ct2_models, fuzzing_limits, mode, data):
    model = ct2_models[mode]
    # Half the flips aim at header bytes, which are a few percent of the file but hold every size and name.
    anywhere = st.integers(0, len(model.data) - 1)
    in_header = st.sampled_from(model.header_offsets)
    offsets = data.draw(st.lists(st.one_of(anywhere, in_header), min_size=1, max_size=6), label="offsets")
    bits = data.draw(st.lists(st.integers(0, 7), min_size=len(offsets), max_size=len(offsets)), label="bits")
    mutated = bytearray(model.data)
    for offset, bit in zip(offsets, bits):
        mutated[offset] ^= 1 << bit
    directory = _case_dir(model, "flipped")
    (directory / "model.bin").write_bytes(bytes(mutated))
    changed = [i for i in set(offsets) if mutated[i] != model.data[i]]
    run_case(
        lambda: _ct2_read(directory),
        model.base,
        len(model.data),
        _allowed_ct2(model, changed),
        _tally("CTranslate2 bit flips"),
    )


def _field_values(width: int, original: int, remaining: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    boundary = [
        0,
        1,
        original - 1,
        original + 1,
        2 * original,
        top,
        top - 1,
        1 << (8 * width - 1),
        remaining,
        remaining + 1,
    ]
    return st.one_of(st.sampled_from([v & top for v in boundary]), st.integers(0, top))


@FUZZ_SETTINGS
@given(mode=MODES, data=st.data())
def test_lying_ctranslate2_size_rank_and_dtype_fields_are_refused(ct2_models, fuzzing_limits, mode, data):
    model = ct2_models[mode]
    mutated = bytearray(model.data)
    changed = []
    for _ in range(data.draw(st.integers(1, 3), label="lies")):
        offset, width, what = data.draw(st.sampled_from(model.fields), label="field")
        original = int.from_bytes(model.data[offset : offset + width], "little")
        value = data.draw(_field_values(width, original, len(model.data) - offset), label=what)
        mutated[offset : offset + width] = value.to_bytes(width, "little")
        changed += [i for i in range(offset, offset + width) if mutated[i] != model.data[i]]
    directory = _case_dir(model, "lying")
    (directory / "model.bin").write_bytes(bytes(mutated))
    run_case(
        lambda: _ct2_read(directory),
        model.base,
        len(model.data),
        _allowed_ct2(model, changed),
        _tally("CTranslate2 lying fields"),
    )


@FUZZ_SETTINGS
@given(mode=MODES, data=st.data())
def test_consistent_lies_about_a_tensors_shape_and_dtype_are_refused(ct2_models, fuzzing_limits, mode, data):
    """A record whose rank, dims, dtype and byte count agree with each other but not with the bytes that follow
    (a huge tensor, a permuted shape, another element type)."""
    model = ct2_models[mode]
    name = data.draw(st.sampled_from(sorted(model.layout.rank)), label="variable")
    dims = data.draw(st.lists(st.one_of(st.integers(1, 64), st.integers(1, 2**32 - 1)), max_size=4), label="dims")
    dtype_id = data.draw(st.sampled_from(sorted(DTYPE_IDS.values())), label="dtype")
    itemsize = {0: 4, 1: 1, 2: 2, 3: 4, 4: 2, 5: 2}[dtype_id]
    numel = 1
    for d in dims:
        numel *= d
    nbytes = (numel * itemsize) & 0xFFFFFFFF
    record = struct.pack("<B", len(dims)) + b"".join(struct.pack("<I", d) for d in dims)
    record += struct.pack("<BI", dtype_id, nbytes)
    start, payload = model.layout.rank[name], model.layout.data[name]
    mutated = model.data[:start] + record + model.data[payload:]
    directory = _case_dir(model, "consistent")
    (directory / "model.bin").write_bytes(mutated)
    # Only this variable's record changed (its length may have too, which shifts nothing before it).
    run_case(
        lambda: _ct2_read(directory),
        model.base,
        len(model.data),
        set(model.feeds[name]),
        _tally("CTranslate2 consistent lies"),
    )


@FUZZ_SETTINGS
@given(mode=MODES, fraction=st.floats(0, 1, exclude_min=True, exclude_max=True), data=st.data())
def test_split_model_with_a_missing_short_or_misordered_part_is_refused(
    ct2_models, fuzzing_limits, mode, fraction, data
):
    model = ct2_models[mode]
    cut = max(1, int(fraction * len(model.data)))
    directory = _case_dir(model, "parts")
    first, second = directory / "model.bin.part1", directory / "model.bin.part2"
    first.write_bytes(model.data[:cut])
    damage = data.draw(st.sampled_from(["missing", "short", "swapped"]), label="damage")
    tail = model.data[cut:]
    if damage == "short":
        tail = tail[: data.draw(st.integers(0, len(tail) - 1), label="kept")]
    second.write_bytes(tail)
    parts = {"missing": [first], "short": [first, second], "swapped": [second, first]}[damage]
    tally = _tally("CTranslate2 split parts")
    run_case(lambda: _ct2_read(directory, parts=parts), model.base, len(model.data), set(), tally, must_fail=True)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face


@dataclass(repr=False)
class HfBase:
    directory: Path
    files: Dict[str, bytes]  # config.json, generation_config.json, model.safetensors
    header: dict  # the safetensors JSON header
    header_end: int  # first payload byte
    base: Result
    upstream: Dict[str, str]  # Hugging Face name -> upstream name

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(f"<Hugging Face directory, {self.size} bytes>")


def _hf_read(directory: Path) -> Result:
    imported = read_huggingface(directory)
    return Result(imported.state_dict, imported.dims, imported.alignment_heads)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> HfBase:
    root = tmp_path_factory.mktemp("hf")
    state = random_state_dict(SMALL_DIMS, seed=3)
    directory = write_huggingface(SMALL_DIMS, state, root / "model", alignment_heads=HEADS)
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    raw = files["model.safetensors"]
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    return HfBase(directory, files, header, 8 + length, _hf_read(directory), {hf_name(k): k for k in state})


def _hf_case(model: HfBase, **replaced: bytes) -> Path:
    directory = model.directory.parent / "case"
    directory.mkdir(exist_ok=True)
    for name, content in {**model.files, **replaced}.items():
        (directory / name).write_bytes(content)
    return directory


def _safetensors_with(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


@FUZZ_SETTINGS
@given(fraction=st.floats(0, 1, exclude_max=True), which=st.sampled_from(["model.safetensors", "config.json"]))
def test_truncated_hugging_face_files_are_refused(hf_model, fuzzing_limits, fraction, which):
    content = hf_model.files[which]
    # Cut at least one character that is not trailing whitespace: without it the JSON would still be complete.
    directory = _hf_case(hf_model, **{which: content[: int(fraction * len(content.rstrip()))]})
    run_case(
        lambda: _hf_read(directory),
        hf_model.base,
        hf_model.size,
        set(),
        _tally("Hugging Face truncation"),
        must_fail=True,
    )


@FUZZ_SETTINGS
@given(data=st.data())
def test_bit_flipped_safetensors_load_the_original_or_are_refused(hf_model, fuzzing_limits, data):
    raw = hf_model.files["model.safetensors"]
    anywhere = st.integers(0, len(raw) - 1)
    in_header = st.integers(0, hf_model.header_end - 1)
    offsets = data.draw(st.lists(st.one_of(anywhere, in_header), min_size=1, max_size=6), label="offsets")
    mutated = bytearray(raw)
    for offset in offsets:
        mutated[offset] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    changed = [i for i in set(offsets) if mutated[i] != raw[i]]
    allowed: Set[str] = set()
    for offset in changed:
        position = offset - hf_model.header_end  # header bytes (negative positions) feed no tensor
        for name, entry in hf_model.header.items():
            if name != "__metadata__" and entry["data_offsets"][0] <= position < entry["data_offsets"][1]:
                allowed.add(hf_model.upstream[name])
    directory = _hf_case(hf_model, **{"model.safetensors": bytes(mutated)})
    run_case(lambda: _hf_read(directory), hf_model.base, hf_model.size, allowed, _tally("safetensors bit flips"))


# Strings without control characters: a newline in a safetensors header is a known bug (see below).
JSON_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), JSON_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(JSON_TEXT, inner, max_size=3)),
    max_leaves=6,
)
SAFETENSORS_DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "U64",
    "X",
    "",
]


@FUZZ_SETTINGS
@given(data=st.data())
def test_lying_safetensors_headers_are_refused(hf_model, fuzzing_limits, data):
    header = json.loads(json.dumps(hf_model.header))
    names = sorted(k for k in header if k != "__metadata__")
    payload = hf_model.files["model.safetensors"][hf_model.header_end :]
    allowed: Set[str] = set()  # tensors whose own entry changed
    for _ in range(data.draw(st.integers(1, 3), label="lies")):
        name = data.draw(st.sampled_from(names), label="tensor")
        lie = data.draw(st.sampled_from(["dtype", "shape", "offsets", "swap", "drop", "rename", "entry"]), label="lie")
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue  # dropped, renamed away or replaced by an earlier lie
        if lie == "dtype":
            entry["dtype"] = data.draw(st.one_of(st.sampled_from(SAFETENSORS_DTYPES), JSON_VALUES), label="dtype")
        elif lie == "shape":
            entry["shape"] = data.draw(
                st.one_of(
                    st.lists(st.one_of(st.integers(0, 64), st.integers(-(2**64), 2**64)), max_size=4),
                    st.permutations(hf_model.header[name]["shape"]).map(list),
                    JSON_VALUES,
                ),
                label="shape",
            )
        elif lie == "offsets":
            bound = len(payload) + 16
            entry["data_offsets"] = data.draw(
                st.one_of(
                    st.lists(st.one_of(st.integers(0, bound), st.integers(-(2**64), 2**64)), min_size=0, max_size=3),
                    JSON_VALUES,
                ),
                label="offsets",
            )
        elif lie == "swap":
            other = data.draw(st.sampled_from(names), label="other")
            theirs = header.get(other)
            if isinstance(theirs, dict) and "data_offsets" in theirs and "data_offsets" in entry:
                entry["data_offsets"], theirs["data_offsets"] = theirs["data_offsets"], entry["data_offsets"]
                allowed.add(hf_model.upstream[other])
        elif lie == "drop":
            del header[name]
        elif lie == "rename":
            header[data.draw(st.sampled_from(names + ["x"]), label="new name")] = header.pop(name)
        else:
            header[name] = data.draw(JSON_VALUES, label="entry")
        allowed.add(hf_model.upstream[name])
    raw = _safetensors_with(header, payload)
    if data.draw(st.booleans(), label="lie about header length"):
        length = data.draw(st.one_of(st.integers(0, len(raw)), st.integers(0, 2**64 - 1)), label="length")
        raw = struct.pack("<Q", length) + raw[8:]
    directory = _hf_case(hf_model, **{"model.safetensors": raw})
    run_case(lambda: _hf_read(directory), hf_model.base, hf_model.size, allowed, _tally("safetensors lying headers"))


def test_a_safetensors_header_with_a_newline_is_refused_in_one_line(hf_model, fuzzing_limits):
    header = json.loads(json.dumps(hf_model.header))
    header["model.decoder.embed_positions.weight"]["dtype"] = {"\n": None}
    raw = _safetensors_with(header, hf_model.files["model.safetensors"][hf_model.header_end :])
    directory = _hf_case(hf_model, **{"model.safetensors": raw})
    run_case(lambda: _hf_read(directory), hf_model.base, hf_model.size, set(), Tally("known bug"), must_fail=True)


CONFIG_KEYS = [
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "num_mel_bins",
    "max_source_positions",
    "max_target_positions",
    "vocab_size",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "model_type",
    "scale_embedding",
    "alignment_heads",
    "torch_dtype",
    "use_cache",
]
SIZES = st.one_of(st.integers(-2, 70), st.sampled_from([0, 2**31, 2**63, 10**30]), JSON_VALUES)


@FUZZ_SETTINGS
@given(data=st.data())
def test_lying_hugging_face_configs_are_refused(hf_model, fuzzing_limits, data):
    which = data.draw(st.sampled_from(["config.json", "generation_config.json"]), label="file")
    config = json.loads(hf_model.files[which])
    for _ in range(data.draw(st.integers(1, 3), label="lies")):
        key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
        if data.draw(st.booleans(), label="delete"):
            config.pop(key, None)
        else:
            config[key] = data.draw(SIZES, label=key)
    if data.draw(st.integers(0, 9), label="replace whole") == 0:
        config = data.draw(JSON_VALUES, label="config")
    # Head counts live only in the config (any divisor of the width gives valid tensors), so a changed count may
    # come back as stated.
    heads = [
        dim
        for dim, key in (("n_audio_head", "encoder_attention_heads"), ("n_text_head", "decoder_attention_heads"))
        if not isinstance(config, dict) or config.get(key) != json.loads(hf_model.files[which]).get(key)
    ]
    text = json.dumps(config).encode()
    if data.draw(st.integers(0, 4), label="damage text") == 0:
        offset = data.draw(st.integers(0, max(0, len(text) - 1)), label="offset")
        text = text[:offset] + bytes([text[offset] ^ 0x20]) + text[offset + 1 :] if text else text
    directory = _hf_case(hf_model, **{which: text})
    run_case(
        lambda: _hf_read(directory),
        hf_model.base,
        hf_model.size,
        set(),
        _tally("Hugging Face configs"),
        compare_heads=which == "config.json",
        free_dims=heads,
    )


def _refuses_config_change(model: HfBase, **changes: object) -> None:
    config = {**json.loads(model.files["config.json"]), **changes}
    directory = _hf_case(model, **{"config.json": json.dumps(config).encode()})
    try:
        run_case(lambda: _hf_read(directory), model.base, model.size, set(), Tally("known bug"), must_fail=True)
    except Hang as hang:
        raise AssertionError(str(hang)) from None


def test_a_config_claiming_a_million_layers_is_refused_quickly(hf_model, fuzzing_limits):
    _refuses_config_change(hf_model, encoder_layers=10**6)


def test_a_config_whose_head_count_does_not_divide_the_width_is_refused(hf_model, fuzzing_limits):
    _refuses_config_change(hf_model, encoder_attention_heads=3)


def test_a_config_claiming_two_billion_heads_is_refused_without_allocating(hf_model, fuzzing_limits):
    _refuses_config_change(hf_model, decoder_attention_heads=2**31)
