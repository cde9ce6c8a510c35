"""Files of a fine-tuning run that let it resume exactly: step directories, their training state, RNG states.

A step directory ``step-NNNNNNN/`` holds ``model.pt`` (our checkpoint format, its weights in the run's
``--save-dtype``) and ``training_state.pt`` (optimizer, scheduler, grad scaler, sampler position, RNG states, config,
and in float32 every weight that the saved dtype rounds, so that a resumed run continues from the exact weights); it
is published by renaming a complete staging directory, so a crash leaves either the previous step directories or a
complete new one. A model file whose weights another file of the run already holds is a hard link to that file.
"""

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import CheckpointError, PathLike, TrainingError
from ..fs.atomic import atomic_torch_save, fsync_directory
from ..fs.outputs import temporary_of
from ..weights.format import load_pt

MODEL_FILE = "model.pt"
STATE_FILE = "training_state.pt"
#: The final evaluation of a recipe run (`whisper_rope.experiments.report`), written beside MODEL_FILE.
REPORT_JSON_FILE = "final_evaluation.json"
REPORT_TABLE_FILE = "final_evaluation.md"
STEP_DIR = re.compile(r"^step-(\d+)$")
#: ``--save-dtype`` choices: the dtype of the weights in a run's model files.
SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: Where `save_step_checkpoint` assembles a step directory before renaming it into place.
STAGING_DIR = re.compile(r"^\.step-(\d+)\.partial$")


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors and plain data (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: Entries every training-state file holds, and their types.
_STATE_ENTRIES = {
    "step": int,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "sampler": dict,
    "rng": dict,
    "config": dict,
    "variant": str,
    "dims": dict,
}


def cast_checkpoint(checkpoint: dict, dtype: torch.dtype) -> dict:
    """``checkpoint`` (our format) with its floating-point weights in ``dtype`` (other entries shared)."""
    weights = checkpoint["model_state_dict"]
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return {**checkpoint, "model_state_dict": cast}


def rounded_weights(weights: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The entries of a state dict that ``dtype`` does not hold exactly, as they are: what a training state keeps
    beside a model file saved in ``dtype`` so that resuming restores the exact weights. Weights loaded from an fp16
    checkpoint and never trained round-trip exactly and are left out."""
    return {
        k: v
        for k, v in weights.items()
        if v.is_floating_point() and v.dtype != dtype and not torch.equal(v.to(dtype).to(v.dtype), v)
    }


def link_or_copy(source: Path, target: Path) -> Path:
    """Make ``target`` a hard link to ``source`` (a copy where the file system has no hard links), replacing
    ``target`` atomically: one copy of the bytes on disk, and removing either name keeps the other intact."""
    temporary = target.with_name(f".{target.name}.link.tmp")
    temporary.unlink(missing_ok=True)
    try:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target


def read_training_state(path: PathLike) -> dict:
    """Read a ``training_state.pt`` with ``weights_only=True``; a damaged, incomplete or hostile file is a
    `TrainingError` naming it (a pickled program in it is refused, never run)."""
    label = str(path)
    try:
        state = load_pt(path, f"training state {label!r}")
    except CheckpointError as error:  # resuming needs it: a training error, same words
        raise TrainingError(str(error)) from None
    if not isinstance(state, dict):
        raise TrainingError(f"training state {label!r} is a {type(state).__name__}, expected a dict")
    for key, kind in _STATE_ENTRIES.items():
        if not isinstance(state.get(key), kind):
            raise TrainingError(f"training state {label!r} has no valid {key!r} entry (expected a {kind.__name__})")
    return state


def restore_entry(path: Path, key: str, load: Callable[[Any], None], state: dict) -> None:
    """Load one entry of a training state into its object; a malformed entry is a TrainingError naming the file."""
    try:
        load(state[key])
    except TrainingError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as error:
        raise TrainingError(f"training state {str(path)!r} has an unusable {key!r} entry ({error})") from None


def step_checkpoints(output: PathLike) -> List[Tuple[int, Path]]:
    """Complete step directories under ``output`` (both files present), oldest first."""
    root = Path(output)
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and (entry / MODEL_FILE).is_file() and (entry / STATE_FILE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output: PathLike) -> Optional[Path]:
    """The newest complete step directory under ``output``, or None."""
    found = step_checkpoints(output)
    return found[-1][1] if found else None


def resolve_resume(path: PathLike) -> Path:
    """A step directory from ``--resume``: the directory itself, or the latest one inside an output directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    if path.is_file() and path.name in (STATE_FILE, MODEL_FILE):
        return resolve_resume(path.parent)
    latest = latest_checkpoint(path)
    if latest is None:
        raise TrainingError(
            f"cannot resume from {str(path)!r}: it holds no complete checkpoint ({MODEL_FILE} and {STATE_FILE}, or "
            "step-N directories with both)"
        )
    return latest


def save_step_checkpoint(
    output: PathLike, step: int, model: Union[dict, Path], training_state: dict, keep_last: int
) -> Path:
    """Write ``step-N/{model.pt, training_state.pt}`` atomically, then prune old step directories. ``model`` is the
    checkpoint dict to save, or a model file of the run holding the same weights, which ``model.pt`` links to.

    Both files go to a hidden staging directory first; renaming it to ``step-N`` publishes them together, so a
    crash leaves either no ``step-N`` or a complete one, and an error or Ctrl-C while writing removes the staging
    directory before it propagates.
    """
    root = Path(output)
    final = root / f"step-{step:07d}"
    staging = root / f".step-{step:07d}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        if isinstance(model, dict):
            atomic_torch_save(model, staging / MODEL_FILE)
        else:
            staging.mkdir(parents=True, exist_ok=True)
            link_or_copy(model, staging / MODEL_FILE)
        atomic_torch_save(training_state, staging / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(root)
    for _, old in step_checkpoints(root)[:-keep_last]:
        # Remove the state first: a half-removed directory is then no longer "complete" and never resumed from.
        (old / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def sweep_temporary_files(output: Path, owned: Sequence[str]) -> None:
    """Remove what this command's writes cut short by a crash left behind in the output directory it owns: staging
    directories (``.step-N.partial``) and the temporary files of atomic writes of the ``owned`` names (``.model.pt.
    XXXXXXXX.tmp``) in it and in its ``best/``. Anything else, a hidden file of the user's included, is left alone."""
    for folder in (output, output / "best"):
        if not folder.is_dir():
            continue
        for leftover in folder.iterdir():
            if folder == output and STAGING_DIR.match(leftover.name) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif temporary_of(leftover.name, (*owned, "metrics.json")) and leftover.is_file():
                leftover.unlink(missing_ok=True)
