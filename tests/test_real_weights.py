"""Integration tests with the real weights the `models` extra installs (tiny.en and multilingual base).

These packages are part of the test environment: if they are missing the tests fail (no skips).
"""

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
