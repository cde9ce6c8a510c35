"""Import CTranslate2 (faster-whisper) Whisper models into upstream Whisper tensors.

A faster-whisper model directory holds ``model.bin`` (sometimes split into ``model.bin.part1``, ``.part2`` ...
that concatenate to it), ``config.json`` (alignment heads, language ids, suppressed tokens) and tokenizer files.

``model.bin`` layout (binary version 4 to 6, little-endian, no padding anywhere)::

    u32 binary_version
    str spec_name                       # "WhisperSpec"
    u32 spec_revision                   # 3 for every current Whisper conversion
    u32 n_variables
    n_variables x:
        str name                        # e.g. "encoder/layer_0/self_attention/linear_0/weight"
        u8  rank
        u32 dims[rank]
        u8  dtype_id                    # 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
        u32 n_bytes
        n_bytes raw row-major data
    u32 n_aliases
    n_aliases x: str alias, str target  # alias shares the target's data

    str = u16 length (counting a trailing NUL) + UTF-8 bytes + NUL

Quantised weights (int8, int16) come with a float ``<name>_scale`` variable: the writer stored
``round(weight * scale)``, so ``weight = stored / scale``, with one scale per output row (int8; a conv kernel's
row is everything but its first axis) or one scale for the whole tensor (int16).

The reader indexes the file first, checking every declared size against the bytes actually there before
allocating anything, then converts tensor by tensor from a read-only memory map.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from whisper_rope.errors import CheckpointError, ModelNotFoundError, PathLike
from whisper_rope.fs.files import inside
from whisper_rope.weights.common import (
    ImportedCheckpoint,
    describe_paths,
    float_dtype_of,
    read_json_object,
)
from whisper_rope.weights.format import alignment_mask, check_dims, check_state_dict

SPEC_NAME = "WhisperSpec"
MIN_BINARY_VERSION = 4  # versions 1-3 stored item sizes instead of dtype ids; no Whisper model uses them
MAX_BINARY_VERSION = 6
MAX_SPEC_REVISION = 3
MAX_RANK = 8  # Whisper tensors have rank <= 3; anything past this is garbage, not a tensor

# dtype id -> (torch dtype, item size in bytes).  The order mirrors CTranslate2's DataType enum.
DTYPES: Dict[int, Tuple[torch.dtype, int]] = {
    0: (torch.float32, 4),
    1: (torch.int8, 1),
    2: (torch.int16, 2),
    3: (torch.int32, 4),
    4: (torch.float16, 2),
    5: (torch.bfloat16, 2),
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_QUANTISED = (torch.int8, torch.int16)

# Smallest possible encodings, used to reject absurd counts before looping over them:
# a variable is name(2+1) + rank(1) + dtype(1) + n_bytes(4); an alias is two empty strings.
_MIN_VARIABLE_BYTES = 9
_MIN_ALIAS_BYTES = 6

# Scalar metadata whose value changes the maths; any other value means a model upstream Whisper cannot express.
_EXPECTED_SCALARS = {
    "decoder/pre_norm": 1,
    "decoder/activation": 3,  # GELU in CTranslate2's Activation enum
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
}


@dataclass(frozen=True)
class Variable:
    """One entry of the model.bin index: where a tensor's bytes are and what they hold."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int  # into the concatenated file
    nbytes: int


# --------------------------------------------------------------------------------------------------------------
# Byte access


class ByteSource:
    """Read-only memory maps of one file, or of several part files taken end to end.

    Variables may straddle a part boundary (the packages here split model.bin at an arbitrary byte), so reads go
    through :meth:`copy`, which stitches pieces together.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.label = describe_paths(self.paths)
        self._maps: List[Optional[mmap.mmap]] = []
        self._starts: List[int] = []
        self.size = 0
        try:
            for path in self.paths:
                self._starts.append(self.size)
                with open(path, "rb") as handle:
                    length = os_size(handle)
                    # mmap refuses empty files; an empty part simply contributes nothing.
                    self._maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if length else None)
                self.size += length
        except FileNotFoundError as exc:
            self.close()
            raise ModelNotFoundError(f"CTranslate2 model file {exc.filename} does not exist.") from exc

    def close(self) -> None:
        """Unmap every part."""
        for part in self._maps:
            if part is not None:
                part.close()
        self._maps = []

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pieces(self, offset: int, length: int) -> Iterator[Tuple[mmap.mmap, int, int]]:
        """Yield (map, start within map, length) covering ``[offset, offset + length)``."""
        for part, start in zip(self._maps, self._starts):
            if part is None or length == 0:
                continue
            end = start + len(part)
            if offset < end and offset + length > start:
                lo = max(offset, start)
                hi = min(offset + length, end)
                yield part, lo - start, hi - lo

    def copy(self, offset: int, length: int) -> bytearray:
        """A fresh, aligned, writable copy of ``length`` bytes at ``offset`` (caller has bounds-checked)."""
        out = bytearray(length)
        pos = 0
        for part, start, size in self._pieces(offset, length):
            out[pos : pos + size] = part[start : start + size]
            pos += size
        return out

    def release(self, offset: int, length: int) -> None:
        """Drop the pages of a converted range from our resident set (the kernel re-reads them if needed)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for part, start, size in self._pieces(offset, length):
            lo = start - start % mmap.PAGESIZE
            hi = start + size
            hi -= hi % mmap.PAGESIZE  # only whole pages: neighbouring variables may still be wanted
            if hi > lo:
                part.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def os_size(handle: Any) -> int:
    """Size in bytes of an open file."""
    handle.seek(0, 2)
    size = handle.tell()
    handle.seek(0)
    return size


class Cursor:
    """Sequential, bounds-checked reader of the model.bin header fields."""

    def __init__(self, source: ByteSource, hint: str = "") -> None:
        self.source = source
        self.pos = 0
        self.hint = hint

    @property
    def remaining(self) -> int:
        return self.source.size - self.pos

    def fail(self, message: str) -> CheckpointError:
        """A CheckpointError about this file."""
        return CheckpointError(f"CTranslate2 model {self.source.label}: {message}{self.hint}")

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes, or CheckpointError if the file ends first."""
        if n > self.remaining:
            raise self.fail(
                f"truncated while reading {what} at byte {self.pos} ({n} bytes needed, {self.remaining} left)."
            )
        data = bytes(self.source.copy(self.pos, n))
        self.pos += n
        return data

    def skip(self, n: int) -> int:
        """Advance past ``n`` bytes (already bounds-checked) and return where they started."""
        start = self.pos
        self.pos += n
        return start

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        """A u16-length-prefixed, NUL-terminated UTF-8 string."""
        length = self.u16(f"the length of {what}")
        if length == 0:
            raise self.fail(f"{what} at byte {self.pos - 2} has length 0, expected at least its NUL terminator.")
        raw = self.take(length, what)
        if raw[-1] != 0:
            raise self.fail(f"{what} at byte {self.pos - length} is not NUL-terminated.")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at byte {self.pos - length} is not valid UTF-8.") from exc


# --------------------------------------------------------------------------------------------------------------
# Index


@dataclass
class ModelIndex:
    """Everything model.bin declares, without the tensor data."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: Dict[str, Variable]  # aliases included, pointing at their target's Variable
    aliases: Dict[str, str]


def read_index(source: ByteSource, hint: str = "") -> ModelIndex:
    """Parse and validate the header of ``source``, checking every size against the file before trusting it."""
    cur = Cursor(source, hint)
    if source.size == 0:
        raise cur.fail("file is empty.")
    version = cur.u32("the binary version")
    if not MIN_BINARY_VERSION <= version <= MAX_BINARY_VERSION:
        raise cur.fail(f"binary version is {version}, expected {MIN_BINARY_VERSION} to {MAX_BINARY_VERSION}.")
    spec_name = cur.string("the spec name")
    if spec_name != SPEC_NAME:
        raise cur.fail(f"spec is {spec_name!r}, expected {SPEC_NAME!r} (only Whisper models can be imported).")
    revision = cur.u32("the spec revision")
    if revision > MAX_SPEC_REVISION:
        raise cur.fail(f"{SPEC_NAME} revision is {revision}, expected at most {MAX_SPEC_REVISION}.")
    count = cur.u32("the variable count")
    if count * _MIN_VARIABLE_BYTES > cur.remaining:
        raise cur.fail(f"declares {count} variables but only {cur.remaining} bytes follow.")
    variables: Dict[str, Variable] = {}
    for i in range(count):
        var = _read_variable(cur, i)
        if var.name in variables:
            raise cur.fail(f"variable {var.name} appears twice.")
        variables[var.name] = var
    aliases = _read_aliases(cur, variables)
    if cur.remaining:
        raise cur.fail(f"has {cur.remaining} unexpected bytes after the alias table at byte {cur.pos}.")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    return ModelIndex(version, spec_name, revision, variables, aliases)


def _read_variable(cur: Cursor, index: int) -> Variable:
    """One variable record; the data bytes are skipped, not read."""
    name = cur.string(f"the name of variable #{index}")
    rank = cur.u8(f"the rank of variable {name}")
    if rank > MAX_RANK:
        raise cur.fail(f"variable {name} declares rank {rank}, expected at most {MAX_RANK}.")
    shape = tuple(cur.u32(f"dimension {d} of variable {name}") for d in range(rank))
    dtype_id = cur.u8(f"the dtype of variable {name}")
    if dtype_id not in DTYPES:
        raise cur.fail(f"variable {name} has unknown dtype id {dtype_id}, expected one of {sorted(DTYPES)}.")
    dtype, itemsize = DTYPES[dtype_id]
    nbytes = cur.u32(f"the byte count of variable {name}")
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * itemsize != nbytes:
        raise cur.fail(
            f"variable {name} declares {nbytes} bytes but its shape {shape} of {dtype} needs {numel * itemsize}."
        )
    if nbytes > cur.remaining:
        raise cur.fail(f"variable {name} declares {nbytes} bytes but only {cur.remaining} remain (file truncated?).")
    return Variable(name, shape, dtype, cur.skip(nbytes), nbytes)


def _read_aliases(cur: Cursor, variables: Dict[str, Variable]) -> Dict[str, str]:
    """The alias table: alias name -> name of a real variable."""
    count = cur.u32("the alias count")
    if count * _MIN_ALIAS_BYTES > cur.remaining:
        raise cur.fail(f"declares {count} aliases but only {cur.remaining} bytes follow.")
    aliases: Dict[str, str] = {}
    for i in range(count):
        alias = cur.string(f"the name of alias #{i}")
        target = cur.string(f"the target of alias {alias}")
        if target not in variables:
            raise cur.fail(f"alias {alias} points at {target}, which is not a variable in the file.")
        if alias in variables or alias in aliases:
            raise cur.fail(f"alias {alias} repeats an existing name.")
        aliases[alias] = target
    return aliases


# --------------------------------------------------------------------------------------------------------------
# Tensor loading


class TensorLoader:
    """Materialises variables one at a time as float tensors, dequantising int8/int16 weights on the way."""

    def __init__(self, source: ByteSource, index: ModelIndex, dtype: torch.dtype) -> None:
        self.source = source
        self.index = index
        self.dtype = dtype
        self.used: set = set()

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"CTranslate2 model {self.source.label}: {message}")

    def has(self, name: str) -> bool:
        return name in self.index.variables

    def variable(self, name: str) -> Variable:
        """The index entry for ``name`` (an alias resolves to its target)."""
        try:
            return self.index.variables[name]
        except KeyError:
            raise self.fail(f"variable {name} is missing; it is part of every Whisper model.") from None

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor exactly as written (its own memory, not a view of the map)."""
        var = self.variable(name)
        self.used.update((name, var.name))  # an alias counts as using its target
        data = self.source.copy(var.offset, var.nbytes)
        self.source.release(var.offset, var.nbytes)
        if var.nbytes == 0:
            return torch.empty(var.shape, dtype=var.dtype)
        return torch.frombuffer(data, dtype=var.dtype).reshape(var.shape)

    def scalar(self, name: str) -> Optional[int]:
        """An integer metadata scalar such as ``encoder/num_heads``, or None when absent."""
        if not self.has(name):
            return None
        value = self.raw(name)
        if value.numel() != 1:
            raise self.fail(f"variable {name} has shape {tuple(value.shape)}, expected a scalar.")
        return int(value.reshape(()).item())

    def tensor(self, name: str) -> torch.Tensor:
        """Variable ``name`` as a float tensor of the output dtype, dequantised if it was stored as integers."""
        var = self.variable(name)
        stored = self.raw(name)
        if var.dtype in _FLOATS:
            return stored if stored.dtype == self.dtype else stored.to(self.dtype)
        if var.dtype not in _QUANTISED:
            raise self.fail(f"variable {name} is stored as {var.dtype}, expected a float or int8/int16 weight.")
        return self._dequantise(name, stored)

    def _dequantise(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """``stored / scale``: the writer multiplied by the scale and rounded."""
        scale_name = f"{name}_scale"
        if not self.has(scale_name):
            raise self.fail(f"variable {name} is quantised ({stored.dtype}) but {scale_name} is missing.")
        scale = self.raw(scale_name).to(torch.float32)
        rows = stored.shape[0] if stored.dim() else 1
        if scale.numel() == rows and stored.dim() >= 1:
            scale = scale.reshape((rows,) + (1,) * (stored.dim() - 1))  # one scale per output row
        elif scale.numel() != 1:
            raise self.fail(f"{scale_name} has {scale.numel()} values, expected 1 or one per row of {name} ({rows}).")
        return (stored.to(torch.float32) / scale).to(self.dtype)

    def unused(self) -> List[str]:
        """Non-scalar variables that no mapping consumed (aliases excluded)."""
        skipped = []
        for name, var in self.index.variables.items():
            if name in self.used or name in self.index.aliases or not var.shape:
                continue
            skipped.append(name)
        return sorted(skipped)


# --------------------------------------------------------------------------------------------------------------
# WhisperSpec -> upstream names

_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


def count_layers(index: ModelIndex, stack: str, fail: Callable[[str], CheckpointError]) -> int:
    """Number of ``<stack>/layer_N`` blocks, which must be numbered 0..N-1."""
    found = set()
    for name in index.variables:
        match = _LAYER.match(name)
        if match and match.group(1) == stack:
            found.add(int(match.group(2)))
    if found != set(range(len(found))):
        raise fail(f"{stack} layers are numbered {sorted(found)}, expected 0 to {len(found) - 1}.")
    if not found:
        raise fail(f"has no {stack} layers.")
    return len(found)


def derive_dims(loader: TensorLoader) -> Dict[str, int]:
    """ModelDimensions from the shapes of key variables and the stored head counts.

    Shapes (d = model width): conv1 weight (d, n_mels, 3); encoder encodings (n_audio_ctx, d);
    decoder embeddings (n_vocab, d); decoder encodings (n_text_ctx, d).
    """
    conv1 = loader.variable("encoder/conv1/weight").shape
    audio_pos = loader.variable("encoder/position_encodings/encodings").shape
    embeddings = loader.variable("decoder/embeddings/weight").shape
    text_pos = loader.variable("decoder/position_encodings/encodings").shape
    for name, shape, rank in (
        ("encoder/conv1/weight", conv1, 3),
        ("encoder/position_encodings/encodings", audio_pos, 2),
        ("decoder/embeddings/weight", embeddings, 2),
        ("decoder/position_encodings/encodings", text_pos, 2),
    ):
        if len(shape) != rank or 0 in shape:
            raise loader.fail(f"variable {name} has shape {shape}, expected {rank} non-zero dimensions.")
    dims = {
        "n_mels": conv1[1],
        "n_audio_ctx": audio_pos[0],
        "n_audio_state": conv1[0],
        "n_audio_head": _heads(loader, "encoder", conv1[0]),
        "n_audio_layer": count_layers(loader.index, "encoder", loader.fail),
        "n_vocab": embeddings[0],
        "n_text_ctx": text_pos[0],
        "n_text_state": embeddings[1],
        "n_text_head": _heads(loader, "decoder", embeddings[1]),
        "n_text_layer": count_layers(loader.index, "decoder", loader.fail),
    }
    return check_dims(dims, f"CTranslate2 model {loader.source.label}")


def _heads(loader: TensorLoader, stack: str, width: int) -> int:
    """The stored head count, or width / 64 (every Whisper model uses 64-wide heads) if the file omits it."""
    heads = loader.scalar(f"{stack}/num_heads")
    if heads is None:
        heads = width // 64
    if heads <= 0 or width % heads:
        raise loader.fail(f"{stack}/num_heads is {heads}, which does not divide the model width {width}.")
    return heads


def check_scalars(loader: TensorLoader) -> None:
    """Refuse files whose metadata describes maths upstream Whisper does not do."""
    for name, expected in _EXPECTED_SCALARS.items():
        value = loader.scalar(name)
        if value is not None and value != expected:
            raise loader.fail(f"variable {name} is {value}, expected {expected} for a Whisper model.")


def _split(tensor: torch.Tensor, parts: int, name: str, loader: TensorLoader) -> List[torch.Tensor]:
    """Split (parts * d, ...) along its rows into ``parts`` tensors of (d, ...) that own their memory."""
    if tensor.shape[0] % parts:
        raise loader.fail(f"variable {name} has {tensor.shape[0]} rows, expected a multiple of {parts}.")
    return [piece.clone() for piece in torch.split(tensor, tensor.shape[0] // parts, dim=0)]


def _linear(loader: TensorLoader, ct2: str, up: str, out: Dict[str, torch.Tensor]) -> None:
    out[f"{up}.weight"] = loader.tensor(f"{ct2}/weight")
    out[f"{up}.bias"] = loader.tensor(f"{ct2}/bias")


def _norm(loader: TensorLoader, ct2: str, up: str, out: Dict[str, torch.Tensor]) -> None:
    out[f"{up}.weight"] = loader.tensor(f"{ct2}/gamma")
    out[f"{up}.bias"] = loader.tensor(f"{ct2}/beta")


def _fused(loader: TensorLoader, ct2: str, ups: Sequence[str], out: Dict[str, torch.Tensor]) -> None:
    """A fused projection split back into upstream's separate Linear layers.

    Self-attention stores q|k|v stacked on rows: weight (3d, d), bias (3d,); cross-attention stores k|v: weight
    (2d, d), bias (2d,).  Each piece becomes a (d, d) weight and a (d,) bias.

    The key projection has no bias upstream; the fused bias carries zeros there.  Dropping it is exact even if it
    were not zero: a key bias adds ``q . b_k`` to every logit of a query alike, which softmax ignores.
    """
    weight_name, bias_name = f"{ct2}/weight", f"{ct2}/bias"
    for up, piece in zip(ups, _split(loader.tensor(weight_name), len(ups), weight_name, loader)):
        out[f"{up}.weight"] = piece
    for up, piece in zip(ups, _split(loader.tensor(bias_name), len(ups), bias_name, loader)):
        if not up.endswith(".key"):
            out[f"{up}.bias"] = piece


def _encoder_layer(loader: TensorLoader, out: Dict[str, torch.Tensor], i: int) -> None:
    ct2, up = f"encoder/layer_{i}", f"encoder.blocks.{i}"
    _fused(loader, f"{ct2}/self_attention/linear_0", [f"{up}.attn.{p}" for p in ("query", "key", "value")], out)
    _linear(loader, f"{ct2}/self_attention/linear_1", f"{up}.attn.out", out)
    _norm(loader, f"{ct2}/self_attention/layer_norm", f"{up}.attn_ln", out)
    _ffn(loader, ct2, up, out)


def _decoder_layer(loader: TensorLoader, out: Dict[str, torch.Tensor], i: int) -> None:
    ct2, up = f"decoder/layer_{i}", f"decoder.blocks.{i}"
    _fused(loader, f"{ct2}/self_attention/linear_0", [f"{up}.attn.{p}" for p in ("query", "key", "value")], out)
    _linear(loader, f"{ct2}/self_attention/linear_1", f"{up}.attn.out", out)
    _norm(loader, f"{ct2}/self_attention/layer_norm", f"{up}.attn_ln", out)
    _linear(loader, f"{ct2}/attention/linear_0", f"{up}.cross_attn.query", out)
    _fused(loader, f"{ct2}/attention/linear_1", [f"{up}.cross_attn.key", f"{up}.cross_attn.value"], out)
    _linear(loader, f"{ct2}/attention/linear_2", f"{up}.cross_attn.out", out)
    _norm(loader, f"{ct2}/attention/layer_norm", f"{up}.cross_attn_ln", out)
    _ffn(loader, ct2, up, out)


def _ffn(loader: TensorLoader, ct2: str, up: str, out: Dict[str, torch.Tensor]) -> None:
    _linear(loader, f"{ct2}/ffn/linear_0", f"{up}.mlp.0", out)
    _linear(loader, f"{ct2}/ffn/linear_1", f"{up}.mlp.2", out)
    _norm(loader, f"{ct2}/ffn/layer_norm", f"{up}.mlp_ln", out)


def _check_projection(loader: TensorLoader, embeddings: torch.Tensor) -> None:
    """Upstream ties the output projection to the token embeddings; refuse a file where they differ."""
    name = "decoder/projection/weight"
    if name in loader.index.aliases:
        target = loader.index.aliases[name]
        if target != "decoder/embeddings/weight":
            raise loader.fail(f"alias {name} points at {target}, expected decoder/embeddings/weight.")
        return
    if loader.has(name) and not torch.equal(loader.tensor(name), embeddings):
        raise loader.fail(f"variable {name} differs from decoder/embeddings/weight; upstream Whisper ties them.")
    bias = "decoder/projection/bias"
    if loader.has(bias) and bool(loader.tensor(bias).any()):
        raise loader.fail(f"variable {bias} is non-zero; upstream Whisper's output projection has no bias.")


Step = Callable[[TensorLoader, Dict[str, torch.Tensor]], None]


def _top_encoder(loader: TensorLoader, out: Dict[str, torch.Tensor]) -> None:
    _linear(loader, "encoder/conv1", "encoder.conv1", out)
    _linear(loader, "encoder/conv2", "encoder.conv2", out)
    out["encoder.positional_embedding"] = loader.tensor("encoder/position_encodings/encodings")
    _norm(loader, "encoder/layer_norm", "encoder.ln_post", out)


def _top_decoder(loader: TensorLoader, out: Dict[str, torch.Tensor]) -> None:
    out["decoder.token_embedding.weight"] = loader.tensor("decoder/embeddings/weight")
    _check_projection(loader, out["decoder.token_embedding.weight"])
    out["decoder.positional_embedding"] = loader.tensor("decoder/position_encodings/encodings")
    _norm(loader, "decoder/layer_norm", "decoder.ln", out)


def _steps(dims: Dict[str, int]) -> List[Step]:
    """The conversion as a list of steps (one per block), so that progress can be reported per step."""
    steps: List[Step] = [_top_encoder]
    steps += [functools.partial(_encoder_layer, i=i) for i in range(dims["n_audio_layer"])]
    steps.append(_top_decoder)
    steps += [functools.partial(_decoder_layer, i=i) for i in range(dims["n_text_layer"])]
    return steps


# --------------------------------------------------------------------------------------------------------------
# Files and public API

_PART = re.compile(r"^model\.bin\.part(\d+)$")


def _part_files(directory: Path) -> List[Path]:
    """``model.bin.partN`` files in ``directory``, in numeric order (each checked by `inside`)."""
    found = []
    for child in directory.iterdir():
        match = _PART.match(child.name)
        if match:
            found.append((int(match.group(1)), inside(directory, child.name, "CTranslate2 part", CheckpointError)))
    return [path for _, path in sorted(found)]


def is_ctranslate2_dir(path: PathLike) -> bool:
    """True if ``path`` is a directory holding ``config.json`` and ``model.bin`` or ``model.bin.part*`` entries (what
    they are is for `read_ctranslate2` to check, so that a link or FIFO there is refused by name)."""
    directory = Path(path)
    if not directory.is_dir() or not os.path.lexists(directory / "config.json"):
        return False
    return os.path.lexists(directory / "model.bin") or any(_PART.match(child.name) for child in directory.iterdir())


def _resolve_files(path: Path, parts: Optional[Sequence[PathLike]]) -> Tuple[List[Path], Optional[Path]]:
    """The model.bin piece(s) to read and the config.json to use (None if there is none).

    Files found in a model directory come from `inside` (a link leading out of it, a FIFO or a device is refused);
    ``parts`` and a model.bin the user names are read as given.
    """
    if parts:
        files = [Path(p) for p in parts]
        config_dir = path if path.is_dir() else path.parent
    elif path.is_dir():
        config_dir = path
        bin_file = inside(path, "model.bin", "CTranslate2 model file", CheckpointError, required=False)
        files = [bin_file] if bin_file is not None else _part_files(path)
        if not files:
            raise ModelNotFoundError(f"Directory {path} has no model.bin or model.bin.part* file.")
    elif path.is_file():
        files, config_dir = [path], path.parent
    else:
        raise ModelNotFoundError(f"CTranslate2 model path {path} does not exist.")
    config = inside(config_dir, "config.json", "CTranslate2 config", CheckpointError, required=False)
    return files, config


def read_config(path: Optional[Path]) -> Dict[str, Any]:
    """The model's config.json as a dict ({} when there is none)."""
    return {} if path is None else read_json_object(path, "CTranslate2 config")


def read_ctranslate2(
    path_or_dir: PathLike,
    parts: Optional[Sequence[PathLike]] = None,
    progress: bool = False,
    dtype: Optional[torch.dtype] = torch.float32,
) -> ImportedCheckpoint:
    """Read a CTranslate2 Whisper model as upstream Whisper tensors.

    Args:
        path_or_dir: a faster-whisper model directory, or a model.bin file (config.json is looked for beside it).
        parts: model.bin pieces to concatenate in this order, for models split across files or packages;
            config.json is then taken from ``path_or_dir`` (a directory, or the directory of a file).
        progress: show a tqdm bar over the conversion steps.
        dtype: float dtype of the output tensors; None keeps the file's float type (float16 stays float16, a
            quantised model becomes its non-quantised tensors' type, float32 if all are quantised).

    Returns:
        ImportedCheckpoint whose state_dict loads strictly into ``whisper.model.Whisper``.

    Raises:
        CheckpointError: the file is truncated, corrupt, not a WhisperSpec model, or not expressible upstream.
        ModelNotFoundError: a path does not exist.
    """
    files, config_path = _resolve_files(Path(path_or_dir), parts)
    config = read_config(config_path)
    hint = " (is a part missing or out of order?)" if len(files) > 1 or _PART.match(files[0].name) else ""
    with ByteSource(files) as source:
        index = read_index(source, hint)
        if dtype is None:
            dtype = float_dtype_of(v.dtype for v in index.variables.values() if v.shape)
        loader = TensorLoader(source, index, dtype)
        state_dict, dims = _convert(loader, progress)
    check_state_dict(state_dict, dims, f"CTranslate2 model {source.label}")
    heads = config.get("alignment_heads")
    alignment = (
        alignment_mask(heads, dims["n_text_layer"], dims["n_text_head"], f"CTranslate2 config {config_path}")
        if heads
        else None
    )
    stored_types = sorted({str(v.dtype).replace("torch.", "") for v in index.variables.values() if v.shape})
    return ImportedCheckpoint(
        dims=dims,
        state_dict=state_dict,
        alignment_heads=alignment,
        source=(
            f"CTranslate2 {index.spec_name} rev {index.spec_revision} (binary v{index.binary_version}, "
            f"{'/'.join(stored_types)}) from {source.label}"
        ),
        extra={k: config[k] for k in ("lang_ids", "suppress_ids", "suppress_ids_begin") if k in config},
    )


def _convert(loader: TensorLoader, progress: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Run every mapping step, then make sure nothing in the file went unused."""
    check_scalars(loader)
    dims = derive_dims(loader)
    steps = _steps(dims)
    state_dict: Dict[str, torch.Tensor] = {}
    bar = _progress_bar(len(steps), progress)
    try:
        for step in steps:
            step(loader, state_dict)
            bar.update(1)
    finally:
        bar.close()
    unused = loader.unused()
    if unused:
        raise loader.fail(f"variable {unused[0]} is not part of the Whisper layout upstream can load.")
    return state_dict, dims


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar (or a disabled one) over the conversion steps, on stderr."""
    return tqdm(total=total, desc="Importing CTranslate2 model", unit="block", disable=not enabled, leave=False)
