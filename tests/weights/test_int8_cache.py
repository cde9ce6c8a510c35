"""The int8 cache: a model read from it is the freshly quantised one, bit for bit; a bad file is rebuilt."""

import logging
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import whisper_rope
from whisper_rope.audio import load_audio
from whisper_rope.compute_type import Int8Linear, quantize_int8
from whisper_rope.errors import CheckpointError
from whisper_rope.weights import int8_cache, packages
from whisper_rope.weights.loading import LoadReport

from ..conftest import FIXTURES, randomise_

ROOT = FIXTURES.parents[1]


def _quantised(dims, variant: str, gated: bool = False):
    model = randomise_(whisper_rope.build_model(dims, variant, gated_rotary=gated)).eval()
    model.set_table_scales(encoder=0.5, decoder=0.25)
    heads = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    heads[1, 0] = heads[0, 1] = True
    model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return quantize_int8(model)


def _saved(model, path):
    report = {"source": "test", "source_variant": model.variant, "target_variant": model.variant}
    info = int8_cache.info_of(model, model.variant, False, 0, report)
    return int8_cache.save(model, info, path)


@pytest.mark.parametrize(("variant", "gated"), [("whisper", False), ("rotary", True)])
def test_a_cached_int8_model_computes_exactly_what_the_quantised_one_does(dims, tmp_path, variant, gated):
    model = _quantised(dims, variant, gated)
    loaded, info = int8_cache.load(_saved(model, tmp_path / "m.safetensors"))
    mel = torch.randn(2, 80, 2 * dims.n_audio_ctx)
    tokens = torch.randint(0, 50000, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(mel, tokens), model(mel, tokens))
    int8_layers = [name for name, module in loaded.named_modules() if isinstance(module, Int8Linear)]
    assert int8_layers == [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    assert len(int8_layers) == 6 * dims.n_audio_layer + 10 * dims.n_text_layer - 4 + 1  # all but 4, + output
    assert (loaded.variant, loaded.gated_rotary, loaded.compute_type) == (model.variant, gated, "int8")
    assert (loaded.encoder.table_scale, loaded.decoder.table_scale) == (0.5, 0.25)
    assert torch.equal(loaded.alignment_heads_dense(), model.alignment_heads_dense())
    assert loaded.settings == model.settings and loaded.settings.one_clip_per_call
    assert info.report["source"] == "test"


def test_a_cache_file_that_does_not_fit_its_model_is_refused_naming_the_tensor(dims, tmp_path):
    path = _saved(_quantised(dims, "whisper"), tmp_path / "m.safetensors")
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    del tensors["decoder.blocks.1.mlp.0.int8_scale"]
    save_file(tensors, tmp_path / "missing.safetensors", metadata=metadata)
    with pytest.raises(
        CheckpointError, match=r"missing.safetensors.*decoder\.blocks\.1\.mlp\.0\.int8_scale is missing"
    ):
        int8_cache.load(tmp_path / "missing.safetensors")
    tensors = load_file(path)
    tensors["encoder.ln_post.weight"] = tensors["encoder.ln_post.weight"][:-1].clone()
    save_file(tensors, tmp_path / "shape.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"encoder\.ln_post\.weight is torch.float32 \(63,\), expected"):
        int8_cache.load(tmp_path / "shape.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="garbage.safetensors cannot be read"):
        int8_cache.load(tmp_path / "garbage.safetensors")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WHISPER_ROPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_load_model_caches_a_named_int8_model_and_reads_it_back_with_the_same_transcript(cache_dir, caplog):
    """Real tiny.en: the first int8 load quantises and writes the cache, the second reads it; the transcripts are
    the same, and so is every int8 weight."""
    fresh = whisper_rope.load_model("tiny.en", device="cpu", compute_type="int8")
    (cached_file,) = cache_dir.glob("tiny.en-*-int8-*.safetensors")
    cached = whisper_rope.load_model("tiny.en", device="cpu", compute_type="int8")
    assert "as the cached int8 model" in cached.load_report.source and str(cached_file) in cached.load_report.source
    assert "cached int8" not in fresh.load_report.source
    assert cached.eot_penalty == fresh.eot_penalty == 0.0  # a named model has none; a load can set one
    assert whisper_rope.load_model("tiny.en", device="cpu", compute_type="int8", eot_penalty=2.0).eot_penalty == 2.0
    assert cached.load_report.loaded == fresh.load_report.loaded
    for (name, a), (_, b) in zip(fresh.named_modules(), cached.named_modules()):
        if isinstance(a, Int8Linear):
            assert all(torch.equal(x, y) for x, y in zip(a.int8_weight(), b.int8_weight())), name
    audio = load_audio(FIXTURES / "speech" / "flite_kal.flac")
    options = {"fp16": False, "temperature": 0.0, "beam_size": 2}
    expected = fresh.transcribe(audio, **options)
    assert cached.transcribe(audio, **options)["text"] == expected["text"] != ""
    # A damaged cache is derived data: one warning, quantised and written again.
    cached_file.write_bytes(cached_file.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        again = whisper_rope.load_model("tiny.en", device="cpu", compute_type="int8")
    assert "cannot be read" in caplog.text and "quantising the model again" in caplog.text
    assert "cached int8" not in again.load_report.source and cached_file.stat().st_size > 10_000_000
    assert again.transcribe(audio, **options)["text"] == expected["text"]


def test_an_int8_load_of_a_path_writes_no_cache(cache_dir, tmp_path, dims):
    path = tmp_path / "model.pt"
    whisper_rope.save_checkpoint(randomise_(whisper_rope.build_model(dims)), path)
    whisper_rope.load_model(path, device="cpu", compute_type="int8")
    assert not list(cache_dir.glob("*int8*"))


def test_a_report_survives_the_cache(dims, tmp_path):
    model = _quantised(dims, "whisper")
    report = LoadReport("src", "whisper", "whisper", loaded=["a"], dropped=["b"], initialised=[])
    info = int8_cache.info_of(model, "whisper", True, 3, report.__dict__)
    _, read = int8_cache.load(int8_cache.save(model, info, tmp_path / "m.safetensors"))
    assert LoadReport(**read.report) == report and (read.trained_unpadded, read.unpadded_margin) == (True, 3)


def test_the_transcribe_command_imports_no_compiler_stack():
    """``torch._dynamo`` (imported by torch's variable-length attention) more than doubles the start-up time of a
    process that only transcribes: the command and the library import it only when a CUDA packed batch needs it."""
    code = "import sys, whisper_rope.cli; print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_a_writable_cache_directory_int8_loads_still_work(tmp_path, monkeypatch):
    """A cache directory that cannot be created (a read-only home) costs only the cache: the model loads, quantised."""
    converted = packages.cached_conversion("tiny.en")  # where the fp16 conversion is (the cache as configured)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("WHISPER_ROPE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(packages, "cached_conversion", lambda name, **_: converted)
    model = whisper_rope.load_model("tiny.en", device="cpu", compute_type="int8")
    assert model.compute_type == "int8" and "cached int8" not in model.load_report.source
