"""Integration tests with the real weights the `models` extra installs (tiny.en and multilingual base).

These packages are part of the test environment: if they are missing the tests fail (no skips).
"""

import json

import torch
import whisper
from whisper.normalizers import EnglishTextNormalizer

import whisper_rope
from whisper_rope import cli
from whisper_rope.audio import load_audio
from whisper_rope.weights import packages

from .conftest import FIXTURES

normalise = EnglishTextNormalizer()
HELLO_WORDS = "hello world this is a test of the speech recognition system"


def test_tiny_en_transcribes_the_fixture():
    model = whisper_rope.load_model("tiny.en", device="cpu")
    assert model.variant == "sinusoidal/learned" and model.dims.n_vocab == 51864
    assert model.load_report.dropped == [] and model.load_report.initialised == []
    result = model.transcribe(str(FIXTURES / "hello.flac"), fp16=False)
    assert normalise(result["text"]) == HELLO_WORDS


def test_whisper_variant_gives_exactly_upstreams_text_and_logits():
    path = packages.cached_conversion("tiny.en", progress=False)
    upstream = whisper.load_model(str(path), device="cpu")
    ours = whisper_rope.load_model(str(path), device="cpu")
    audio = load_audio(FIXTURES / "speech" / "flite_slt.flac")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))[None]
    tokens = torch.tensor([[50257, 50362, 50256, 2545]])
    assert torch.equal(ours(mel, tokens), upstream(mel, tokens))
    for options in ({}, {"beam_size": 5, "word_timestamps": True}):
        expected = upstream.transcribe(audio, fp16=False, **options)
        got = ours.transcribe(audio, fp16=False, **options)
        assert got["text"] == expected["text"]
        assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in expected["segments"]]


def test_base_detects_english():
    model = whisper_rope.load_model("base", device="cpu")
    assert model.is_multilingual and model.dims.n_text_layer == 6
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(load_audio(FIXTURES / "hello.flac")))
    _, probs = model.detect_language(mel)
    assert max(probs, key=probs.get) == "en" and probs["en"] > 0.9


def test_rotary_variant_of_tiny_en_loads_by_the_table():
    model = whisper_rope.load_model("tiny.en", variant="rotary", device="cpu")
    assert sorted(model.load_report.dropped) == ["decoder.positional_embedding", "encoder.positional_embedding"]
    assert len(model.load_report.loaded) == 165


def test_readme_main_command(tmp_path):
    assert (
        cli.main(
            [
                "--model",
                "tiny.en",
                "--fp16",
                "False",
                "--output_dir",
                str(tmp_path),
                "--verbose",
                "False",
                str(FIXTURES / "hello.flac"),
            ]
        )
        == 0
    )
    assert normalise((tmp_path / "hello.txt").read_text()) == HELLO_WORDS


def _transcribe_json(tmp_path, monkeypatch, *flags: str):
    """``whisper-rope transcribe`` of hello.flac with tiny.en on the CPU and ``flags``: (the compute type of the model
    it ran, whether any layer of it is an `Int8Linear`, the JSON it wrote)."""
    from whisper_rope.cli import transcribe as command
    from whisper_rope.compute_type import Int8Linear

    models = []
    original = command._transcribe_batch

    def recording(model, *args, **kwargs):
        models.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(command, "_transcribe_batch", recording)
    out = tmp_path / "-".join(flags or ["default"])
    argv = ["--model", "tiny.en", "--device", "cpu", "--fp16", "False", "--verbose", "False", "-f", "json"]
    assert cli.main([*argv, *flags, "--output_dir", str(out), str(FIXTURES / "hello.flac")]) == 0
    [model] = models
    int8_layers = any(isinstance(module, Int8Linear) for module in model.modules())
    return model.compute_type, int8_layers, json.loads((out / "hello.json").read_text())


def test_the_command_runs_int8_on_the_cpu_by_default_and_float32_is_upstreams_path(tmp_path, monkeypatch):
    compute_type, int8_layers, result = _transcribe_json(tmp_path, monkeypatch)
    assert (compute_type, int8_layers) == ("int8", True)  # --compute_type auto: int8 on the CPU
    assert normalise(result["text"]) == HELLO_WORDS
    compute_type, int8_layers, result = _transcribe_json(tmp_path, monkeypatch, "--compute_type", "float32")
    assert (compute_type, int8_layers) == ("float32", False)
    # Upstream's command at its defaults (beam 5, best of 5, temperature fallback), token for token.
    upstream = whisper.load_model(str(packages.cached_conversion("tiny.en", progress=False)), device="cpu")
    expected = upstream.transcribe(str(FIXTURES / "hello.flac"), fp16=False, beam_size=5, best_of=5, language="en")
    assert result["text"] == expected["text"]
    assert [s["tokens"] for s in result["segments"]] == [s["tokens"] for s in expected["segments"]]
    # The Python API keeps upstream's numerics by default: what the float32 command ran.
    assert whisper_rope.load_model("tiny.en", device="cpu").compute_type == "float32"
