"""Read and write Hugging Face ``WhisperForConditionalGeneration`` checkpoints without importing ``transformers``.

A Hugging Face Whisper directory holds ``config.json`` (a ``WhisperConfig``) and the weights as
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``) or ``pytorch_model.bin``.
The tensors are upstream Whisper's under other names::

    encoder.blocks.N.attn.query          model.encoder.layers.N.self_attn.q_proj   (key/value/out: k/v/out_proj)
    encoder.blocks.N.attn_ln             model.encoder.layers.N.self_attn_layer_norm
    decoder.blocks.N.cross_attn.*        model.decoder.layers.N.encoder_attn.*
    decoder.blocks.N.cross_attn_ln       model.decoder.layers.N.encoder_attn_layer_norm
    *.mlp.0 / *.mlp.2 / *.mlp_ln         *.fc1 / *.fc2 / *.final_layer_norm
    encoder.ln_post / decoder.ln         model.encoder.layer_norm / model.decoder.layer_norm
    *.positional_embedding               model.*.embed_positions.weight
    decoder.token_embedding.weight       model.decoder.embed_tokens.weight (proj_out.weight is tied to it)

Both sides keep the query unscaled (Hugging Face scales at run time too), so tensors carry over unchanged.

A model fine-tuned for unpadded input (each clip's own frames, its sinusoid table sliced) keeps those settings in
``config.json`` under ``whisper_rope`` (``{"unpadded": true, "unpadded_margin": 50, "eot_penalty": 2.0}``), which
`read_huggingface` restores; transformers keeps unknown config keys as they are, but pads every input to 30 s itself
and applies no end-of-text penalty.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from whisper_rope.errors import CheckpointError, ModelNotFoundError, PathLike, one_line
from whisper_rope.fs.atomic import atomic_write, umasked
from whisper_rope.fs.files import inside
from whisper_rope.weights.common import (
    MULTILINGUAL_MIN_VOCAB,
    ImportedCheckpoint,
    alignment_pairs,
    float_dtype_of,
    read_json_object,
)
from whisper_rope.weights.format import (
    alignment_mask,
    check_dims,
    check_rotary_options,
    check_state_dict,
    check_storage,
    load_pt,
    upstream_shapes,
)

SAFETENSORS = "model.safetensors"
#: Every file `write_huggingface` writes into its directory.
EXPORT_FILES = ("config.json", "generation_config.json", SAFETENSORS)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
TIED_OUTPUT = "proj_out.weight"
#: The config.json key of whisper_rope's input settings, and the settings it may hold.
INPUT_OPTIONS_KEY = "whisper_rope"
INPUT_OPTIONS = ("unpadded", "unpadded_margin", "eot_penalty")

# (pattern on an upstream name, replacement) applied in order; the first group of rules renames whole names.
_TO_HF = [
    (r"^encoder\.positional_embedding$", "encoder.embed_positions.weight"),
    (r"^decoder\.positional_embedding$", "decoder.embed_positions.weight"),
    (r"^decoder\.token_embedding\.", "decoder.embed_tokens."),
    (r"^encoder\.ln_post\.", "encoder.layer_norm."),
    (r"^decoder\.ln\.", "decoder.layer_norm."),
    (r"\.blocks\.", ".layers."),
    (r"\.attn\.", ".self_attn."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."),
    (r"\.cross_attn_ln\.", ".encoder_attn_layer_norm."),
    (r"_attn\.query\.", "_attn.q_proj."),
    (r"_attn\.key\.", "_attn.k_proj."),
    (r"_attn\.value\.", "_attn.v_proj."),
    (r"_attn\.out\.", "_attn.out_proj."),
    (r"\.mlp\.0\.", ".fc1."),
    (r"\.mlp\.2\.", ".fc2."),
    (r"\.mlp_ln\.", ".final_layer_norm."),
]


def hf_name(upstream: str, prefix: str = "model.") -> str:
    """The Hugging Face name of an upstream Whisper tensor, e.g. ``encoder.blocks.0.mlp.0.weight`` ->
    ``model.encoder.layers.0.fc1.weight``."""
    name = upstream
    for pattern, replacement in _TO_HF:
        name = re.sub(pattern, replacement, name)
    return prefix + name


# --------------------------------------------------------------------------------------------------------------
# Config


def special_tokens(n_vocab: int) -> Dict[str, Optional[int]]:
    """Token ids of ``<|endoftext|>`` and ``<|startoftranscript|>`` (None for a vocabulary too small to hold them).

    Whisper's English-only vocabulary is GPT-2's 50256 tokens + ``<|endoftext|>`` = 50256; the multilingual one has
    one more ordinary token, moving every special token up by one.  ``<|startoftranscript|>`` follows end-of-text.
    """
    eot = 50257 if n_vocab >= MULTILINGUAL_MIN_VOCAB else 50256
    if n_vocab <= eot + 1:  # not a Whisper vocabulary (e.g. a toy model): ids would index past the embeddings
        return {"eot": None, "sot": None}
    return {"eot": eot, "sot": eot + 1}


def dims_to_config(dims: Dict[str, int], dtype: torch.dtype, alignment: Optional[list]) -> Dict[str, Any]:
    """A ``WhisperConfig`` dict for ``dims``, with the token ids of the English-only or multilingual vocabulary."""
    if dims["n_audio_state"] != dims["n_text_state"]:
        raise CheckpointError(
            f"Hugging Face Whisper has one width, but n_audio_state is {dims['n_audio_state']} "
            f"and n_text_state is {dims['n_text_state']}."
        )
    tokens = special_tokens(dims["n_vocab"])
    config: Dict[str, Any] = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "d_model": dims["n_audio_state"],
        "encoder_layers": dims["n_audio_layer"],
        "encoder_attention_heads": dims["n_audio_head"],
        "encoder_ffn_dim": 4 * dims["n_audio_state"],
        "decoder_layers": dims["n_text_layer"],
        "decoder_attention_heads": dims["n_text_head"],
        "decoder_ffn_dim": 4 * dims["n_text_state"],
        "num_mel_bins": dims["n_mels"],
        "max_source_positions": dims["n_audio_ctx"],
        "max_target_positions": dims["n_text_ctx"],
        "vocab_size": dims["n_vocab"],
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "use_cache": True,
        "bos_token_id": tokens["eot"],
        "eos_token_id": tokens["eot"],
        "pad_token_id": tokens["eot"],
        # transformers insists on an int here; 0 is a placeholder for toy vocabularies without Whisper's tokens.
        "decoder_start_token_id": tokens["sot"] if tokens["sot"] is not None else 0,
        "begin_suppress_tokens": [220, tokens["eot"]] if tokens["eot"] is not None else [],  # " " and end-of-text
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if alignment is not None:
        config["alignment_heads"] = alignment
    return config


def config_to_dims(config: Dict[str, Any], origin: str) -> Dict[str, int]:
    """ModelDimensions from a ``WhisperConfig`` dict."""
    if config.get("model_type") != "whisper":
        raise CheckpointError(f"{origin} has model_type {config.get('model_type')!r}, expected 'whisper'.")
    try:
        dims = {
            "n_mels": config["num_mel_bins"],
            "n_audio_ctx": config["max_source_positions"],
            "n_audio_state": config["d_model"],
            "n_audio_head": config["encoder_attention_heads"],
            "n_audio_layer": config["encoder_layers"],
            "n_vocab": config["vocab_size"],
            "n_text_ctx": config["max_target_positions"],
            "n_text_state": config["d_model"],
            "n_text_head": config["decoder_attention_heads"],
            "n_text_layer": config["decoder_layers"],
        }
    except KeyError as exc:
        raise CheckpointError(f"{origin} lacks {one_line(repr(exc.args[0]))}, which a WhisperConfig needs.") from None
    dims = check_dims(dims, origin)
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if key in config and config[key] != 4 * dims["n_audio_state"]:
            raise CheckpointError(f"{origin} has {key} {config[key]}, but upstream Whisper uses 4 x d_model.")
    if config.get("scale_embedding"):
        raise CheckpointError(f"{origin} sets scale_embedding, which upstream Whisper does not do.")
    return dims


# --------------------------------------------------------------------------------------------------------------
# Reading


def is_huggingface_dir(path: PathLike) -> bool:
    """True if ``path`` is a directory with a Whisper ``config.json`` and safetensors or PyTorch weights."""
    directory = Path(path)
    config = directory / "config.json"
    if not directory.is_dir() or not config.is_file():
        return False
    if not any((directory / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN)):
        return False
    try:
        return read_json_object(config, "Hugging Face file").get("model_type") == "whisper"
    except CheckpointError:  # unreadable, not JSON, not an object, not a regular file
        return False


def _tensor_getter(directory: Path) -> Dict[str, Callable[[], torch.Tensor]]:
    """Stored name -> function reading that one tensor, so tensors are materialised one at a time.

    Every file comes from `inside`: a shard an index names, or a link, that leads out of ``directory`` is refused,
    and so is anything that is not a regular file.
    """
    single = inside(directory, SAFETENSORS, "Hugging Face weights", CheckpointError, required=False)
    if single is not None:
        return _safetensors_getters([single])
    index = inside(directory, SAFETENSORS_INDEX, "Hugging Face index", CheckpointError, required=False)
    if index is not None:
        weight_map = read_json_object(index, "Hugging Face index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"Hugging Face index {index} has no weight_map object.")
        odd = [name for name in weight_map.values() if not isinstance(name, str)]
        if odd:
            raise CheckpointError(
                f"Hugging Face index {index} names shard {one_line(repr(odd[0]), 80)}, expected a file name."
            )
        shards = {inside(directory, name, "shard", CheckpointError) for name in set(weight_map.values())}
        return _safetensors_getters(sorted(shards))
    pytorch = inside(directory, PYTORCH_BIN, "Hugging Face weights", CheckpointError, required=False)
    if pytorch is not None:
        return _pytorch_getters(pytorch)
    raise ModelNotFoundError(f"Hugging Face directory {directory} has no {SAFETENSORS} or {PYTORCH_BIN}.")


def _safetensors_getters(files: list) -> Dict[str, Callable[[], torch.Tensor]]:
    getters: Dict[str, Callable[[], torch.Tensor]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(
                f"Hugging Face weights {path} are not a readable safetensors file: {one_line(exc)}."
            ) from exc
        for name in names:
            getters[name] = functools.partial(_safetensors_tensor, path, name)
    return getters


def _safetensors_tensor(path: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"Hugging Face weights {path}: tensor {one_line(name)} cannot be read: {one_line(exc)}."
        ) from exc


def _pytorch_getters(path: Path) -> Dict[str, Callable[[], torch.Tensor]]:
    """pytorch_model.bin through `load_pt` (``weights_only=True``, memory-mapped when the file allows it), each
    tensor's elements checked to be its own (`check_storage`)."""
    state = load_pt(path, f"Hugging Face weights {path}", mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Hugging Face weights {path} do not hold a dict of tensors.")
    # Before any tensor is copied: an expanded view would otherwise become a tensor of the size it claims.
    # transformers saves proj_out.weight as the embeddings' own storage, so tensors may share.
    check_storage(state, f"Hugging Face weights {path}", shared=True)
    return {name: functools.partial(_same, tensor) for name, tensor in state.items()}


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _prefix(getters: Dict[str, Any], origin: str) -> str:
    """``model.`` for WhisperForConditionalGeneration files, ``""`` for bare WhisperModel files."""
    if "model.decoder.embed_tokens.weight" in getters:
        return "model."
    if "decoder.embed_tokens.weight" in getters:
        return ""
    raise CheckpointError(f"{origin} has no model.decoder.embed_tokens.weight; it is not a Whisper checkpoint.")


def read_huggingface(directory: PathLike, dtype: Optional[torch.dtype] = torch.float32) -> ImportedCheckpoint:
    """Read a Hugging Face Whisper directory as upstream Whisper tensors.

    Args:
        directory: holds config.json and model.safetensors (or its shard index) or pytorch_model.bin;
            generation_config.json, if present, supplies the alignment heads.
        dtype: float dtype of the output tensors; None keeps the stored one.

    Returns:
        ImportedCheckpoint whose state_dict loads strictly into ``whisper.model.Whisper``.

    Raises:
        CheckpointError: the config or weights do not describe an upstream-compatible Whisper model.
        ModelNotFoundError: the directory or its weights are missing.
    """
    directory = Path(directory)
    if not os.path.lexists(directory / "config.json"):
        raise ModelNotFoundError(f"Hugging Face directory {directory} has no config.json.")
    origin = f"Hugging Face model {directory}"
    config_path = inside(directory, "config.json", "Hugging Face file", CheckpointError)
    config = read_json_object(config_path, "Hugging Face file")
    dims = config_to_dims(config, f"{directory / 'config.json'}")
    getters = _tensor_getter(directory)
    prefix = _prefix(getters, origin)
    _check_layer_counts(getters, prefix, dims, directory / "config.json")
    expected = upstream_shapes(dims)
    names = {upstream: hf_name(upstream, prefix) for upstream in expected}
    unexpected = sorted(set(getters) - set(names.values()) - {TIED_OUTPUT})
    if unexpected:
        raise CheckpointError(
            f"{origin} has tensor {one_line(repr(unexpected[0]))}, which upstream Whisper has no place for."
        )
    state_dict = _load_tensors(getters, names, dtype, origin)
    check_state_dict(state_dict, dims, origin)
    _check_tied_output(getters, state_dict["decoder.token_embedding.weight"], origin)
    return ImportedCheckpoint(
        dims=dims,
        state_dict=state_dict,
        alignment_heads=_alignment(directory, config, dims),
        source=f"Hugging Face Whisper from {directory}",
        input_options=_input_options(config, dims, directory / "config.json"),
    )


def _input_options(config: Dict[str, Any], dims: Dict[str, int], path: Path) -> Dict[str, Any]:
    """The ``whisper_rope`` input settings of a config.json ({} when it has none), checked like a checkpoint's."""
    options = config.get(INPUT_OPTIONS_KEY, {})
    if not isinstance(options, dict) or set(options) - set(INPUT_OPTIONS):
        raise CheckpointError(
            f"{path} has {INPUT_OPTIONS_KEY!r} {one_line(repr(options), 80)}, expected an object with only "
            f"{', '.join(INPUT_OPTIONS)}"
        )
    return check_rotary_options(options, dims, str(path)) if options else {}


def _check_layer_counts(getters: Dict[str, Any], prefix: str, dims: Dict[str, int], config: Path) -> None:
    """Refuse a config whose layer counts differ from the layers the weights hold.

    Done before any per-layer name is built, so that a small config.json claiming millions of layers costs nothing.
    """
    for side, key, dim in (
        ("encoder", "encoder_layers", "n_audio_layer"),
        ("decoder", "decoder_layers", "n_text_layer"),
    ):
        pattern = re.compile(rf"{re.escape(prefix)}{side}\.layers\.(\d{{1,9}})\.")
        present = set()
        for name in getters:
            match = pattern.match(name)
            if match:
                present.add(int(match.group(1)))
        claimed = dims[dim]
        if len(present) != claimed or (present and max(present) != claimed - 1):
            found = f"{len(present)} (numbered up to {max(present)})" if present else "none"
            raise CheckpointError(f"{config} says {key} is {claimed}, but the weights hold {side} layers: {found}.")


def _load_tensors(
    getters: Dict[str, Callable[[], torch.Tensor]],
    names: Dict[str, str],
    dtype: Optional[torch.dtype],
    origin: str,
) -> Dict[str, torch.Tensor]:
    """Upstream name -> tensor, read one at a time and cast to ``dtype`` (None: the stored float type)."""
    missing = sorted(hf for hf in names.values() if hf not in getters)
    if missing:
        raise CheckpointError(f"{origin} lacks tensor {missing[0]} (and {len(missing) - 1} more) that Whisper needs.")
    state_dict: Dict[str, torch.Tensor] = {}
    for upstream, hf in names.items():
        tensor = getters[hf]()
        if not tensor.is_floating_point():
            raise CheckpointError(f"{origin}: tensor {hf} is {tensor.dtype}, expected floating point.")
        # Cast as we go so that only one tensor exists in both dtypes at a time.
        state_dict[upstream] = tensor.to(dtype).contiguous() if dtype is not None else tensor
    if dtype is None:  # "as stored": unify the rare mixed-precision file on its narrowest float type
        target = float_dtype_of(t.dtype for t in state_dict.values())
        state_dict = {name: t.to(target).contiguous() for name, t in state_dict.items()}
    return state_dict


def _check_tied_output(getters: Dict[str, Callable[[], torch.Tensor]], embed: torch.Tensor, origin: str) -> None:
    """Upstream has no separate output projection; a stored proj_out.weight must equal the token embeddings."""
    if TIED_OUTPUT not in getters:
        return
    output = getters[TIED_OUTPUT]()
    if output.shape != embed.shape or not torch.equal(output.to(embed.dtype), embed):
        raise CheckpointError(f"{origin}: {TIED_OUTPUT} differs from the token embeddings; upstream Whisper ties them.")


def _alignment(directory: Path, config: Dict[str, Any], dims: Dict[str, int]) -> Optional[torch.Tensor]:
    """Alignment heads from generation_config.json (where Hugging Face keeps them) or config.json."""
    generation = inside(directory, "generation_config.json", "Hugging Face file", CheckpointError, required=False)
    sources = [(generation, read_json_object(generation, "Hugging Face file"))] if generation is not None else []
    sources.append((directory / "config.json", config))
    for path, data in sources:
        if data.get("alignment_heads"):
            return alignment_mask(data["alignment_heads"], dims["n_text_layer"], dims["n_text_head"], str(path))
    return None


# --------------------------------------------------------------------------------------------------------------
# Writing


def write_huggingface(
    dims: Dict[str, int],
    state_dict: Dict[str, torch.Tensor],
    out_dir: PathLike,
    alignment_heads: Optional[torch.Tensor] = None,
    overwrite: bool = False,
    input_options: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a Hugging Face ``WhisperForConditionalGeneration`` directory from upstream-named tensors.

    ``state_dict`` must hold exactly upstream Whisper's tensors (as ``whisper.model.Whisper(...).state_dict()``);
    models with other positional schemes (rotary variants) are for the caller to refuse, since Hugging Face
    Whisper has no place for them.  Tensors keep their dtype.  The directory (config.json, generation_config.json,
    model.safetensors) is assembled in a temporary sibling and renamed into place, so ``out_dir`` is either absent
    or complete.

    Args:
        dims: ``ModelDimensions`` fields.
        state_dict: upstream-named float tensors.
        out_dir: directory to create; must not exist (or be empty) unless ``overwrite``.
        alignment_heads: bool (n_text_layer, n_text_head) mask, stored as [layer, head] pairs.
        overwrite: replace an existing ``out_dir``.
        input_options: whisper_rope's input settings to keep in config.json (``unpadded``, ``unpadded_margin``,
            ``eot_penalty``).

    Returns:
        ``out_dir`` as a Path.
    """
    dims = check_dims(dict(dims), "write_huggingface")
    check_state_dict(state_dict, dims, "write_huggingface input")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"Output directory {out_dir} already exists and is not empty.")
    pairs = alignment_pairs(alignment_heads) if alignment_heads is not None else None
    dtype = float_dtype_of(t.dtype for t in state_dict.values())
    config = dims_to_config(dims, dtype, pairs)
    if input_options:
        config[INPUT_OPTIONS_KEY] = {key: input_options[key] for key in INPUT_OPTIONS if key in input_options}
    tensors = _exportable(state_dict)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        _writing(
            out_dir / SAFETENSORS, lambda: save_file(tensors, str(staging / SAFETENSORS), metadata={"format": "pt"})
        )
        _writing(out_dir / "config.json", lambda: _write_json(staging / "config.json", config))
        generation = _generation_config(config, pairs)
        _writing(
            out_dir / "generation_config.json", lambda: _write_json(staging / "generation_config.json", generation)
        )
        os.chmod(staging, umasked(0o777))  # mkdtemp makes 0700; the user's umask decides, as for any new folder
        os.chmod(staging / SAFETENSORS, umasked(0o666))  # safetensors creates 0600
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _writing(target: Path, write: Callable[[], Any]) -> None:
    """Run ``write``; a failure (safetensors' SafetensorError, torch's or Python's OSError) becomes an OSError whose
    one-line message names ``target`` and the cause (e.g. "[Errno 28] cannot write .../model.safetensors: No space
    left on device")."""
    try:
        write()
    except (OSError, SafetensorError) as exc:
        code = getattr(exc, "errno", None)
        if code is None:  # SafetensorError: "I/O error: File too large (os error 27)"
            match = re.search(r"os error (\d+)", str(exc))
            code = int(match.group(1)) if match else None
        cause = os.strerror(code) if code else one_line(exc)
        raise OSError(code or errno.EIO, f"cannot write {target}: {cause}") from exc


def _exportable(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face-named, contiguous CPU tensors that share no memory, as safetensors requires.

    The tied output projection is left out, as transformers itself does when saving.
    """
    tensors: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:  # a view into a tensor already taken (e.g. split from a fused weight): own copy
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[hf_name(name)] = tensor
    return tensors


def _generation_config(config: Dict[str, Any], pairs: Optional[list]) -> Dict[str, Any]:
    """The generation defaults transformers reads beside config.json (alignment heads live here)."""
    generation = {
        key: config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "begin_suppress_tokens")
    }
    generation["max_length"] = config["max_target_positions"]
    if pairs is not None:
        generation["alignment_heads"] = pairs
    return generation


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    atomic_write(path, lambda handle: handle.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging directory onto ``out_dir``, setting aside any existing one first."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        os.rmdir(out_dir)
        os.rename(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
