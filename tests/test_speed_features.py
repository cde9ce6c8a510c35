"""Transcription speed features: the fast RoPE form, unpadded transcription, batched decoding, the benchmark."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
import whisper.decoding
from whisper.audio import N_FRAMES, N_SAMPLES

import whisper_rope
from whisper_rope import cli, positional
from whisper_rope.audio import load_audio
from whisper_rope.decoding import BatchDecodingTask
from whisper_rope.features import real_frame_counts, trailing_padding_start
from whisper_rope.longform import transcribe_chunked
from whisper_rope.positional import RotaryEmbedding, apply_rotary, rotate_half
from whisper_rope.speech_chunks import speech_chunks
from whisper_rope.transcribe import transcribe_many

from .conftest import FIXTURES, randomise_, small_dims

SPEECH = sorted((FIXTURES / "speech").glob("*.flac"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speech():
    return [load_audio(path) for path in SPEECH]


def _random_rotary(n_text_ctx: int = 32, n_vocab: int = 51864):
    """A small random `rotary` model with upstream's 1500 audio positions, encoding unpadded."""
    torch.manual_seed(0)
    dims = small_dims(n_audio_ctx=1500, n_text_ctx=n_text_ctx)
    dims.n_vocab = n_vocab
    model = randomise_(whisper_rope.build_model(dims, "rotary")).eval()
    model.unpadded = True
    return model


def _first_window(audio: np.ndarray) -> torch.Tensor:
    """The first window exactly as upstream `transcribe` builds it: real frames, then zero frames up to 30 s."""
    mel = whisper.log_mel_spectrogram(audio, padding=N_SAMPLES)
    return whisper.pad_or_trim(mel[:, : mel.shape[-1] - N_FRAMES], N_FRAMES)


class _EncoderLengths:
    """Records the number of audio positions of every encoder call."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.encoder.register_forward_hook(lambda _, __, out: self.lengths.append(out.shape[1]))

    def __enter__(self):
        return self.lengths

    def __exit__(self, *_):
        self.handle.remove()


# RoPE ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float16, 5e-3)])
def test_apply_rotary_equals_the_textbook_rotation(dtype, atol):
    rotary = RotaryEmbedding(head_dim=64)
    x = torch.randn(2, 37, 6, 64).to(dtype)
    angles = positional.rotary_angles(torch.arange(5, 42), 64, 10000.0)
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    textbook = x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()
    torch.testing.assert_close(rotary.rotate(x, offset=5).float(), textbook, atol=atol, rtol=0)


def test_apply_rotary_keeps_gradients():
    cos, sin = RotaryEmbedding(head_dim=8).tables(5, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 5, 2, 8, requires_grad=True)
    rotated = apply_rotary(x, cos[:, None], sin[:, None])
    with torch.no_grad():
        torch.testing.assert_close(rotated, apply_rotary(x, cos[:, None], sin[:, None]))
    rotated.square().sum().backward()
    # A rotation keeps norms, so d/dx |R x|^2 = 2 x.
    torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-5, rtol=1e-5)


def test_rope_tables_are_computed_once_for_all_layers_steps_and_calls(monkeypatch):
    model = _random_rotary(n_text_ctx=448)
    model.unpadded = False
    calls = []
    original = positional.rotary_angles
    monkeypatch.setattr(positional, "rotary_angles", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    mel = torch.randn(2, 80, 3000)
    options = whisper.DecodingOptions(language="en", sample_len=6, fp16=False, beam_size=2)
    model.decode(mel, options)
    model.decode(mel, options)
    assert calls == [1500, 448]  # one table per side, for its whole context, reused by every later step and call


# Unpadded transcription -----------------------------------------------------------------------------------------


def test_real_frame_counts_find_silence_and_zero_padding(speech):
    audio = speech[0]
    n_content = len(audio) // 160
    silence_padded = whisper.log_mel_spectrogram(audio, padding=N_SAMPLES)[:, :N_FRAMES]
    zero_padded = _first_window(audio)  # what upstream transcribe gives the model
    counts = real_frame_counts(torch.stack([silence_padded, zero_padded]))
    # The fixture ends in digital silence, which is indistinguishable from padding and is cut too.
    assert counts[0] == counts[1] == real_frame_counts(zero_padded[:, : N_FRAMES // 2])[0]
    assert n_content - 60 <= int(counts[0]) <= n_content and int(counts[0]) % 2 == 0
    assert trailing_padding_start(zero_padded) == int(counts[0])
    full = torch.randn(80, 3000)
    assert trailing_padding_start(full) == 3000


def test_unpadded_transcribe_encodes_only_the_real_frames():
    model = _random_rotary()
    audio = load_audio(FIXTURES / "hello.flac")
    with _EncoderLengths(model) as lengths:
        model.transcribe(audio, fp16=False, temperature=0.0, language="en")
    assert lengths and max(lengths) <= len(audio) // 320 + 1


def test_unpadded_long_form_transcription_with_word_timestamps(speech):
    gap = np.zeros(8000, dtype=np.float32)
    audio = np.concatenate([piece for clip in speech * 3 for piece in (clip, gap)])[: 40 * 16000]
    model = _random_rotary()
    with _EncoderLengths(model) as lengths:
        result = model.transcribe(audio, fp16=False, temperature=0.0, language="en", word_timestamps=True)
    words = [word for segment in result["segments"] for word in segment["words"]]
    assert words and all(0.0 <= w["start"] <= w["end"] <= 40.0 for w in words)
    assert max(segment["end"] for segment in result["segments"]) > 30.0  # the second window was transcribed
    # A (nearly) full first window, then windows that end with the audio: only their real frames are encoded.
    assert max(lengths) > 1400 and min(lengths) < 600


def test_kv_cache_with_few_unpadded_frames_keeps_cross_attention_keys_and_matches_full_forward(monkeypatch):
    """Upstream's cache hook takes a projection with at most n_text_ctx (448) positions for self-attention and would
    concatenate it; unpadded audio of at most 8.96 s has that few. Harmless only while cross-attention keys are
    computed once per cache: every step here checks that, and that cached logits equal a full forward pass."""
    model = _random_rotary(n_text_ctx=448)
    reference = whisper_rope.build_model(model.dims, "rotary").eval()
    reference.load_state_dict(model.state_dict())
    errors, cross_lengths = [], set()
    original = whisper.decoding.PyTorchInference.logits

    def checked(self, tokens, audio_features):
        cached = original(self, tokens, audio_features)
        for block in self.model.decoder.blocks:
            cross_lengths.add(self.kv_cache[block.cross_attn.key].shape[1])
            cross_lengths.add(self.kv_cache[block.cross_attn.value].shape[1])
        with torch.no_grad():
            full = reference.decoder(tokens, audio_features)[:, -cached.shape[1] :]
        errors.append((cached - full).abs().max().item())
        return cached

    monkeypatch.setattr(whisper.decoding.PyTorchInference, "logits", checked)
    window = _first_window(load_audio(SPEECH[0]))
    result = model.decode(window, whisper.DecodingOptions(language="en", beam_size=3, sample_len=20, fp16=False))
    n_audio = result.audio_features.shape[0]
    assert n_audio <= 448 and cross_lengths == {n_audio}
    assert len(errors) >= 10 and max(errors) < 1e-5


def _load_rotary_checkpoint(tmp_path, trained_unpadded, caplog, **load_options):
    model = _random_rotary()
    model.unpadded = trained_unpadded
    path = whisper_rope.save_checkpoint(model, tmp_path / f"rotary_{trained_unpadded}.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisper_rope"):
        loaded = whisper_rope.load_model(path, device="cpu", **load_options)
    return loaded, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_unpadded_option_is_stored_and_warns_for_checkpoints_not_trained_unpadded(tmp_path, caplog):
    loaded, warnings = _load_rotary_checkpoint(tmp_path, True, caplog)
    assert loaded.unpadded and loaded.rotary_options["unpadded"] and not warnings
    loaded, warnings = _load_rotary_checkpoint(tmp_path, False, caplog)
    assert not loaded.unpadded and not warnings
    loaded, warnings = _load_rotary_checkpoint(tmp_path, False, caplog, unpadded=True)
    assert loaded.unpadded
    assert len(warnings) == 1 and "was not fine-tuned for unpadded input" in warnings[0]


# Batched decoding ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [None, 3])
def test_unpadded_batch_decodes_each_clip_as_if_alone(speech, beam_size):
    model = _random_rotary(n_text_ctx=448)
    windows = torch.stack([_first_window(audio) for audio in speech[:4]])
    assert len(set(real_frame_counts(windows).tolist())) > 1  # the clips differ in length
    options = whisper.DecodingOptions(language="en", beam_size=beam_size, sample_len=12, fp16=False)
    batched = model.decode(windows, options)
    for window, result in zip(windows, batched):
        alone = model.decode(window, options)
        assert result.tokens == alone.tokens and len(alone.tokens) > 0
        assert result.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
        assert result.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-5)


def test_unpadded_batch_detects_each_clips_language(speech):
    model = _random_rotary(n_vocab=51865)  # a multilingual vocabulary
    windows = torch.stack([_first_window(audio) for audio in speech[:3]])
    options = whisper.DecodingOptions(sample_len=4, fp16=False)
    batched = model.decode(windows, options)
    for window, result in zip(windows, batched):
        alone = model.decode(window, options)
        assert result.language == alone.language and result.tokens == alone.tokens


def _record_batches(monkeypatch):
    sizes = []
    run = BatchDecodingTask.run
    monkeypatch.setattr(BatchDecodingTask, "run", lambda self, mel: sizes.append(mel.shape[0]) or run(self, mel))
    return sizes


def _assert_same_results(batched, alone):
    assert batched["text"] == alone["text"] and batched["language"] == alone["language"]
    assert len(batched["segments"]) == len(alone["segments"])
    for ours, theirs in zip(batched["segments"], alone["segments"]):
        assert set(ours) == set(theirs)
        for key in ("id", "seek", "start", "end", "text", "tokens", "temperature", "words"):
            assert ours.get(key) == theirs.get(key), key
        for key in ("avg_logprob", "compression_ratio", "no_speech_prob"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key


def test_transcribe_many_equals_one_by_one_with_tiny_en(speech, monkeypatch):
    model = whisper_rope.load_model("tiny.en", device="cpu")
    options = dict(temperature=0.0, fp16=False, condition_on_previous_text=True)
    alone = [model.transcribe(audio, **options) for audio in speech]
    sizes = _record_batches(monkeypatch)
    batched = transcribe_many(model, SPEECH, batch_size=5, **options)
    assert sizes == [5, 3]  # two batched decodes, and no clip decoded again
    for ours, theirs in zip(batched, alone):
        _assert_same_results(ours, theirs)
    assert "kitchen table" in batched[SPEECH.index(FIXTURES / "speech" / "espeak_en.flac")]["text"]


def test_transcribe_many_unpadded_word_timestamps_and_long_clips(speech, monkeypatch):
    model = _random_rotary(n_text_ctx=448)
    long_clip = np.concatenate(speech * 5)[: 31 * 16000]
    clips = speech[:3] + [long_clip] + speech[3:5]
    options = dict(temperature=0.0, fp16=False, beam_size=2, word_timestamps=True, sample_len=12)
    alone = [model.transcribe(audio, **options) for audio in clips[:3] + clips[4:]]
    chunked = transcribe_chunked(model, long_clip, batch_size=8, **options)
    sizes = _record_batches(monkeypatch)
    batched = transcribe_many(model, clips, batch_size=8, **options)
    # The 31-s recording goes first, as voice-activity chunks in one batch; then the five short clips in one batch.
    assert sizes[1] == 5 and sizes[0] == len(speech_chunks(long_clip)) >= 1
    for ours, theirs in zip(batched[:3] + batched[4:], alone):
        _assert_same_results(ours, theirs)
    _assert_same_results(batched[3], chunked)


def test_transcribe_many_redecodes_failed_clips_alone_at_the_next_temperature(speech, monkeypatch):
    model = _random_rotary()
    sizes = _record_batches(monkeypatch)
    # Every average log-probability is below 0: every batched result fails and falls back to temperature 1.
    results = transcribe_many(
        model,
        speech[:3],
        batch_size=3,
        temperature=(0.0, 1.0),
        logprob_threshold=0.0,
        no_speech_threshold=None,
        fp16=False,
        sample_len=6,
    )
    assert sizes[0] == 3 and all(size == 1 for size in sizes[1:]) and len(sizes) >= 4
    assert all(segment["temperature"] == 1.0 for result in results for segment in result["segments"])


def test_cli_batch_size_writes_the_same_files(tmp_path):
    model = _random_rotary()
    model_file = whisper_rope.save_checkpoint(model, tmp_path / "rotary.pt")
    outputs = {}
    for batch_size in (1, 4):
        out = tmp_path / f"out{batch_size}"
        status = cli.main(
            [
                *map(str, SPEECH[:3]),
                "--model",
                str(model_file),
                "--batch_size",
                str(batch_size),
                "--output_dir",
                str(out),
                "--fp16",
                "False",
                "--verbose",
                "False",
                "--beam_size",
                "2",
                "--temperature_increment_on_fallback",
                "None",
                "--unpadded",
                "True",
            ]
        )
        assert status == 0
        outputs[batch_size] = {p.name: p.read_text() for p in sorted(out.iterdir())}
    assert len(outputs[1]) == 15 and outputs[1].keys() == outputs[4].keys()
    for name, text in outputs[1].items():
        if name.endswith(".json"):
            ours, theirs = json.loads(outputs[4][name]), json.loads(text)
            _assert_same_results(ours, theirs)
        else:
            assert outputs[4][name] == text, name


# Benchmark -------------------------------------------------------------------------------------------------------


def test_benchmark_script_runs_in_quick_mode(tmp_path):
    """Keeps benchmarks/transcribe_speed.py working (its numbers are not checked)."""
    out = tmp_path / "results.json"
    script = ROOT / "benchmarks" / "transcribe_speed.py"
    finetuned = whisper_rope.save_checkpoint(whisper_rope.build_model(small_dims(), "rotary"), tmp_path / "ft.pt")
    chosen = [
        "openai-whisper",
        "whisper_rope whisper",
        "whisper_rope rotary unpadded, batch 8",
        "fine-tuned rotary",
        "fine-tuned rotary unpadded, batch 8",
        "faster-whisper int8",
    ]
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--json",
            str(out),
            "--finetuned",
            str(finetuned),
            "--clips",
            str(FIXTURES / "speech" / "manifest.jsonl"),
            "--systems",
            *chosen,
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {row["system"] for row in results["end_to_end"]} == set(chosen)
    assert [row["measure"] for row in results["rope_overhead"]][0] == "encoder forward"
    assert "| clips | decoding | system |" in run.stdout
