"""Upstream's transcribe, decode and word timestamps run unchanged on every variant."""

import json

import numpy as np
import pytest
import torch
import whisper.utils

import whisper_rope
from whisper_rope import cli
from whisper_rope.audio import load_audio
from whisper_rope.decoding.task import BatchDecodingTask
from whisper_rope.fs.outputs import OutputRecord
from whisper_rope.transcription import transcribe as transcribe_module
from whisper_rope.transcription.longform import transcribe_chunked
from whisper_rope.transcription.speech_chunks import speech_chunks
from whisper_rope.transcription.transcribe import transcribe_many

from ..conftest import FIXTURES, SPEECH_CLIPS, randomise_, small_dims
from ..speech_helpers import EncoderLengths, random_rotary


@pytest.fixture(scope="module")
def hello_audio():
    return load_audio(FIXTURES / "hello.flac")


@pytest.mark.parametrize("variant", whisper_rope.available_variants())
def test_word_timestamps_run_for_every_preset(variant, hello_audio):
    torch.manual_seed(0)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), variant)).eval()
    result = model.transcribe(hello_audio, word_timestamps=True, fp16=False, temperature=0.0, language="en")
    words = [word for segment in result["segments"] for word in segment["words"]]
    assert words, "no words decoded"
    assert all(0.0 <= w["start"] <= w["end"] <= 30.0 for w in words)


def test_unpadded_transcribe_encodes_only_the_real_frames():
    model = random_rotary()
    audio = load_audio(FIXTURES / "hello.flac")
    with EncoderLengths(model) as lengths:
        model.transcribe(audio, fp16=False, temperature=0.0, language="en")
    assert lengths and max(lengths) <= len(audio) // 320 + 1


def test_unpadded_long_form_transcription_with_word_timestamps(speech):
    gap = np.zeros(8000, dtype=np.float32)
    audio = np.concatenate([piece for clip in speech * 3 for piece in (clip, gap)])[: 40 * 16000]
    model = random_rotary()
    with EncoderLengths(model) as lengths:
        result = model.transcribe(audio, fp16=False, temperature=0.0, language="en", word_timestamps=True)
    words = [word for segment in result["segments"] for word in segment["words"]]
    assert words and all(0.0 <= w["start"] <= w["end"] <= 40.0 for w in words)
    assert max(segment["end"] for segment in result["segments"]) > 30.0  # the second window was transcribed
    # A (nearly) full first window, then windows that end with the audio: only their real frames are encoded.
    assert max(lengths) > 1400 and min(lengths) < 600


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
    batched = transcribe_many(model, SPEECH_CLIPS, batch_size=5, **options)
    assert sizes == [5, 3]  # two batched decodes, and no clip decoded again
    for ours, theirs in zip(batched, alone):
        _assert_same_results(ours, theirs)
    assert "kitchen table" in batched[SPEECH_CLIPS.index(FIXTURES / "speech" / "espeak_en.flac")]["text"]


def test_transcribe_many_unpadded_word_timestamps_and_long_clips(speech, monkeypatch):
    model = random_rotary(n_text_ctx=448)
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


def test_transcribe_many_decodes_long_recordings_together_within_a_memory_bound(speech, monkeypatch):
    calls = []

    def recorded(model, audios, batch_size, **options):
        calls.append([len(audio) // 16000 for audio in audios])
        return [{"text": f"{len(audio) // 16000} s"} for audio in audios]

    monkeypatch.setattr(transcribe_module, "transcribe_recordings", recorded)
    model = random_rotary()
    seconds = [40, 50, 35]
    clips = [np.zeros(s * 16000, dtype=np.float32) for s in seconds[:2]] + [speech[0], np.zeros(35 * 16000)]
    results = transcribe_many(model, clips, batch_size=8, temperature=0.0, fp16=False, sample_len=2)
    assert calls == [seconds]  # one call for the three long recordings; the short clip decoded on its own
    assert [r["text"] for r in results[:2] + results[3:]] == ["40 s", "50 s", "35 s"] and "segments" in results[2]

    calls.clear()
    monkeypatch.setattr(transcribe_module, "_LONG_AUDIO_HELD", 90 * 16000)
    transcribe_many(model, clips, batch_size=8, temperature=0.0, fp16=False, sample_len=2)
    assert calls == [[40, 50], [35]]  # a third recording would exceed the samples held: the first two go first


def test_transcribe_many_redecodes_failed_clips_alone_at_the_next_temperature(speech, monkeypatch):
    model = random_rotary()
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
    model = random_rotary()
    model_file = whisper_rope.save_checkpoint(model, tmp_path / "rotary.pt")
    outputs = {}
    for batch_size in (1, 4):
        out = tmp_path / f"out{batch_size}"
        status = cli.main(
            [
                *map(str, SPEECH_CLIPS[:3]),
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
        outputs[batch_size] = {p.name: p.read_text() for p in sorted(out.iterdir()) if p.name != OutputRecord.NAME}
    assert len(outputs[1]) == 15 and outputs[1].keys() == outputs[4].keys()
    for name, text in outputs[1].items():
        if name.endswith(".json"):
            ours, theirs = json.loads(outputs[4][name]), json.loads(text)
            _assert_same_results(ours, theirs)
        else:
            assert outputs[4][name] == text, name


def test_cli_batched_verbose_output_names_each_file_in_input_order(tmp_path, capsys):
    model_file = whisper_rope.save_checkpoint(random_rotary(), tmp_path / "rotary.pt")
    # The longest clip first: batches decode shortest first, and the console must still follow the input order.
    clips = sorted(SPEECH_CLIPS, key=lambda path: -len(load_audio(path)))[:1] + [FIXTURES / "hello.flac"]
    assert len(load_audio(clips[0])) > len(load_audio(clips[1]))
    out = tmp_path / "out"
    status = cli.main(
        [*map(str, clips), "--model", str(model_file), "--batch_size", "2", "--output_dir", str(out), "--fp16",
         "False", "--beam_size", "2", "--temperature_increment_on_fallback", "None", "--output_format", "json"]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out.splitlines()
    expected = []
    for clip in clips:
        expected.append(f"{clip}:")
        for segment in json.loads((out / f"{clip.stem}.json").read_text())["segments"]:
            start, end = (whisper.utils.format_timestamp(segment[key]) for key in ("start", "end"))
            expected.append(f"[{start} --> {end}] {segment['text']}")
    assert len(expected) > 3  # each file printed some segments
    assert printed == expected
