"""A whole recording in one window: a table-free encoder reads 40 s in one pass (2000 audio positions, beyond a
30-s window's 1500), ``evaluate --long-form single`` gives the text of decoding it directly, and models that add a
table are refused in one line."""

import json

import numpy as np
import pytest
import soundfile
import torch
from whisper.audio import SAMPLE_RATE
from whisper.decoding import DecodingOptions
from whisper.model import Whisper

import whisper_rope
from whisper_rope.audio import load_audio
from whisper_rope.cli.evaluate import main
from whisper_rope.evaluation.evaluate import evaluate
from whisper_rope.transcription.single_window import (
    MAX_SINGLE_SECONDS,
    check_single_window,
    decode_single_window,
    single_window_mel,
)

from ..conftest import SPEECH_CLIPS, randomise_, small_dims

GREEDY = DecodingOptions(language="en", without_timestamps=True, fp16=False)


@pytest.fixture(scope="module")
def forty_seconds():
    """40 s of the fixture sentences, each followed by 0.5 s of silence, the last one running to the end."""
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    clips = [load_audio(path) for path in SPEECH_CLIPS]
    pieces = [piece for clip in clips * 4 for piece in (clip, pause)]
    audio = np.concatenate(pieces)[: 40 * SAMPLE_RATE]
    assert len(audio) == 40 * SAMPLE_RATE
    return audio


def _rotary_model():
    torch.manual_seed(0)
    return randomise_(whisper_rope.build_model(small_dims(), "rotary/learned")).eval()


def test_a_rotary_encoder_reads_forty_seconds_in_one_pass(forty_seconds):
    model = _rotary_model()
    encoder_inputs = []
    model.encoder.register_forward_hook(lambda module, inputs, output: encoder_inputs.append(output.shape))
    mel = single_window_mel(model, forty_seconds)
    assert mel.shape[0] == 80 and 4000 <= mel.shape[1] <= 4002 and mel.shape[1] % 2 == 0
    with torch.no_grad():
        assert model.encoder(mel[None, :, :4000]).shape == (1, 2000, 64)  # 40 s: 2000 positions, past 1500
    result = decode_single_window(model, forty_seconds, GREEDY)
    assert encoder_inputs[-1] == (1, mel.shape[1] // 2, 64)  # the decode encoded every frame, once
    assert len(encoder_inputs) == 2
    cached = model.encoder.rotary._tables[(torch.device("cpu"), torch.float32)][0]
    assert cached.shape[0] == mel.shape[1] // 2  # the RoPE cache grew past the 24 positions of the model's dims
    assert 0 < len(result.tokens) <= model.dims.n_text_ctx
    assert not model.unpadded  # the model's own setting is back


def test_models_that_add_a_table_are_refused_in_one_line(forty_seconds):
    model = randomise_(whisper_rope.build_model(small_dims(), "rotary+sinusoidal/learned"))
    with pytest.raises(ValueError, match=r"^long_form 'single' needs an encoder without an absolute table: variant "):
        decode_single_window(model, forty_seconds)
    with pytest.raises(ValueError, match="upstream's encoder adds a 1500-position table"):
        check_single_window(Whisper(small_dims()))
    model.set_table_scales(encoder=0.0)  # a transplant whose table is annealed away adds none
    check_single_window(model)


def test_audio_beyond_the_limit_is_refused(forty_seconds):
    long = np.concatenate([forty_seconds, forty_seconds])
    assert len(long) / SAMPLE_RATE > MAX_SINGLE_SECONDS
    with pytest.raises(ValueError, match="a single window takes at most 60 s of audio, got 80.0 s"):
        decode_single_window(_rotary_model(), long)


@pytest.fixture
def manifest(tmp_path, forty_seconds):
    soundfile.write(tmp_path / "long.wav", forty_seconds, SAMPLE_RATE)
    short = SPEECH_CLIPS[0]
    rows = [{"audio": str(short), "text": short.with_suffix(".txt").read_text().strip()}]
    rows.append({"audio": "long.wav", "text": "forty seconds of sentences"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path / "data.jsonl"


def test_evaluate_long_form_single_gives_the_text_of_decoding_it_directly(manifest, tmp_path, capsys):
    model = _rotary_model()
    checkpoint = whisper_rope.save_checkpoint(model, tmp_path / "rotary.pt")
    output = tmp_path / "out.json"
    argv = ["--model", str(checkpoint), "--data", str(manifest), "-o", str(output), "--no-progress"]
    assert main(argv + ["--device", "cpu", "--long-form", "single", "--cap-factor", "0"]) == 0
    assert "1 recording over 30 s transcribed through a single window each" in capsys.readouterr().out
    rows = [json.loads(line) for line in output.with_suffix(".jsonl").read_text().splitlines()]
    assert [row["long_form"] for row in rows] == [None, "single"]
    direct = decode_single_window(model, load_audio(manifest.parent / "long.wav"), GREEDY)
    assert rows[1]["hypothesis"] == direct.text and rows[1]["n_tokens"] == len(direct.tokens)
    assert rows[1]["cap"] == 32  # two 30-s windows' limits (cap factor 0), as the default sample_len
    result = evaluate(model, manifest, long_form="single", cap_factor=0, progress=False)
    assert result.rows[1].hypothesis == direct.text


def test_evaluate_long_form_single_refuses_a_table_model_before_reading_audio(manifest, tmp_path, capsys):
    checkpoint = whisper_rope.save_checkpoint(
        randomise_(whisper_rope.build_model(small_dims(), "whisper")), tmp_path / "whisper.pt"
    )
    argv = ["--model", str(checkpoint), "--data", str(manifest), "-o", str(tmp_path / "o.json"), "--no-progress"]
    assert main(argv + ["--device", "cpu", "--long-form", "single"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error.startswith("whisper-rope: error: --long-form single needs an encoder without an absolute table: ")
    assert "variant 'sinusoidal/learned' adds a 24-position table to the encoder" in error
    assert not (tmp_path / "o.json").exists()
