"""Batched long-form transcription: speech chunks from a real voice-activity detector, segments on the recording's
timeline, every output format, unpadded encoders fed each chunk at its own length."""

import json

import numpy as np
import pytest
import torch
from whisper.audio import N_SAMPLES, SAMPLE_RATE
from whisper.decoding import DecodingResult
from whisper.normalizers import EnglishTextNormalizer
from whisper.timing import WordTiming, find_alignment
from whisper.tokenizer import get_tokenizer

import whisper_rope
from whisper_rope import cli
from whisper_rope.audio import load_audio
from whisper_rope.features import first_transcription_window
from whisper_rope.transcription import longform
from whisper_rope.transcription.longform import (
    split_at_breaks,
    split_at_timestamps,
    transcribe_chunked,
    transcribe_recordings,
)
from whisper_rope.transcription.speech_chunks import SpeechChunk, pack_chunks, pack_tails, speech_spans
from whisper_rope.transcription.transcribe import transcribe_many

from ..conftest import FIXTURES, randomise_, small_dims

SPEECH = FIXTURES / "speech"
NAMES = ["flite_slt", "espeak_en", "flite_kal", "espeak_en_us", "flite_awb", "espeak_en_f3", "espeak_en_m3"] * 2
normalise = EnglishTextNormalizer()


def _recording(gap_s: float = 1.5):
    """Fixtures separated by ``gap_s`` of silence (about 52 s): audio and each sentence's (start s, end s, text)."""
    pieces, placed, position = [], [], 0
    for name in NAMES:
        audio = load_audio(SPEECH / f"{name}.flac")
        placed.append(
            (position / SAMPLE_RATE, (position + len(audio)) / SAMPLE_RATE, (SPEECH / f"{name}.txt").read_text())
        )
        pieces += [audio, np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.float32)]
        position += len(audio) + int(gap_s * SAMPLE_RATE)
    return np.concatenate(pieces), placed


def test_pack_chunks_keeps_every_span_in_order_within_30_seconds():
    spans = [(0, 100_000), (150_000, 400_000), (420_000, 600_000), (700_000, 1_180_000), (1_200_000, 1_210_000)]
    chunks = pack_chunks(spans, max_samples=N_SAMPLES)
    assert [chunk.spans for chunk in chunks] == [
        ((0, 100_000), (150_000, 400_000)),
        ((420_000, 600_000),),
        ((700_000, 1_180_000),),
        ((1_200_000, 1_210_000),),
    ]
    assert all(chunk.n_samples <= N_SAMPLES for chunk in chunks)
    with pytest.raises(ValueError, match="longer than 480000 samples"):
        pack_chunks([(0, N_SAMPLES + 1)], max_samples=N_SAMPLES)
    # By default a chunk holds at most 25 s, leaving the end of its 30-s window free (speech_chunks.py: why).
    assert [chunk.spans for chunk in pack_chunks(spans[:3])] == [
        ((0, 100_000), (150_000, 400_000)),
        ((420_000, 600_000),),
    ]
    with pytest.raises(ValueError, match="longer than 400000 samples"):
        pack_chunks([(0, 400_001)])


def test_chunk_times_map_back_to_the_recording_across_seams():
    chunk = SpeechChunk(((16_000, 48_000), (80_000, 96_000)))  # 1-3 s and 5-6 s of the recording
    assert chunk.duration == 3.0
    assert chunk.recording_time(0.0) == 1.0
    assert chunk.recording_time(1.5) == 2.5
    assert chunk.recording_time(2.0) == 5.0  # the seam, as a start: the second span
    assert chunk.recording_time(2.0, is_end=True) == 3.0  # as an end: the first span
    assert chunk.recording_time(2.5) == 5.5
    assert chunk.recording_time(9.0, is_end=True) == 6.0  # clamped to the chunk's last sample
    recording = np.arange(100_000, dtype=np.float32)
    assert np.array_equal(chunk.audio(recording), np.concatenate([recording[16_000:48_000], recording[80_000:96_000]]))


def test_voice_activity_finds_each_sentence_and_keeps_the_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        audio, placed = _recording(gap_s=1.5)
        spans = speech_spans(audio)
        assert torch.get_num_threads() == 2  # importing silero_vad sets it to 1; the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    seconds = [(start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in spans]
    assert len(seconds) >= len(placed)
    for start, end, _ in placed:  # every sentence lies inside the detected speech, give or take 0.3 s
        inside = [s for s in seconds if s[0] - 0.3 <= start and s[1] >= start]
        assert inside, (start, end, seconds)
    silence = [(placed[i][1] + 0.4, placed[i + 1][0] - 0.4) for i in range(len(placed) - 1)]
    for start, end in silence:  # the middle of every pause is not speech
        assert not any(s < end and e > start for s, e in seconds), (start, end, seconds)
    assert speech_spans(np.zeros(SAMPLE_RATE * 5, dtype=np.float32)) == []


def test_the_rest_of_a_chunk_after_a_time_is_a_chunk_of_its_own():
    chunk = SpeechChunk(((16_000, 48_000), (80_000, 96_000)))  # 1-3 s and 5-6 s of the recording
    assert chunk.after(0.5).spans == ((24_000, 48_000), (80_000, 96_000))  # cut inside the first span
    assert chunk.after(2.0).spans == ((80_000, 96_000),)  # on the seam: the second span whole
    assert chunk.after(2.25).spans == ((84_000, 96_000),)
    assert chunk.after(0.0) == chunk
    assert chunk.after(3.0) is None and chunk.after(7.5) is None
    assert chunk.after(2.25).recording_time(0.0) == 5.25


def test_packed_tails_remember_where_one_ends_and_the_next_begins():
    tails = [
        SpeechChunk(((800_000, 900_000),)),  # 50-56.25 s
        SpeechChunk(((16_000, 48_000), (64_000, 96_000))),  # 1-3 s and 4-6 s: one tail of two spans
        SpeechChunk(((2_000_000, 2_300_000),)),  # 125-143.75 s
    ]
    packed = pack_tails(tails)
    assert [(chunk.spans, chunk.breaks) for chunk in packed] == [
        (((16_000, 48_000), (64_000, 96_000), (800_000, 900_000)), (2,)),  # in recording order, a break per tail
        (((2_000_000, 2_300_000),), ()),  # 25 s at most: the next window
    ]
    assert packed[0].parts() == [(0.0, 4.0), (4.0, 10.25)]
    assert pack_chunks([span for tail in tails for span in tail.spans])[0].breaks == ()
    # The rest of a packed chunk keeps its breaks; packed again, its parts stay apart.
    rest = packed[0].after(3.5)
    assert (rest.spans, rest.breaks) == (((88_000, 96_000), (800_000, 900_000)), (1,))
    assert packed[0].after(4.0).breaks == () and packed[0].after(4.0).parts() == [(0.0, 6.25)]
    assert pack_tails([rest])[0] == rest


def test_a_chunk_whose_text_ends_early_is_decoded_again_from_there(monkeypatch):
    """Like upstream's loop resuming at the last timestamp: the untranscribed tail becomes a chunk of its own,
    its segments follow the chunk's on the recording's timeline; a tail shorter than MIN_TAIL_SECONDS or a text cut
    by the token cap is left alone, and the passes are bounded."""
    tokenizer = get_tokenizer(False)
    ts, word = tokenizer.timestamp_begin, tokenizer.encode(" hello")
    chunk = SpeechChunk(((16_000, 176_000),))  # 1-11 s of the recording, one 10-s chunk
    monkeypatch.setattr(longform, "speech_chunks", lambda audio: [chunk])
    answers = {
        10.0: [ts, *word, ts + 100, ts + 100, *word, ts + 200],  # ends at 4 s of 10: 6 s untranscribed
        6.0: [ts, *word, ts + 150],  # the tail's text ends at 3 s of 6: decoded again
        3.0: [ts, *word, ts + 140],  # 2.8 s of 3: within MIN_TAIL_SECONDS, done
    }
    decoded = []

    def window_holding_its_duration(audio, n_mels):
        return torch.full((n_mels, 3000), len(audio) / SAMPLE_RATE), len(audio) // 160

    def fake_decode(model, mels, language, options):
        durations = [round(float(mel[0, 0]), 1) for mel in mels]
        decoded.extend(durations)
        return [DecodingResult(audio_features=None, language="en", tokens=answers[d]) for d in durations]

    monkeypatch.setattr(longform, "first_transcription_window", window_holding_its_duration)
    monkeypatch.setattr(longform, "_decode_with_fallback", fake_decode)
    model = whisper_rope.build_model(small_dims(), "whisper")
    result = transcribe_chunked(model, np.zeros(200_000, dtype=np.float32), language="en", temperature=0.0)
    assert decoded == [10.0, 6.0, 3.0]
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(1.0, 3.0), (3.0, 5.0), (5.0, 8.0), (8.0, 10.8)]
    assert [s["id"] for s in result["segments"]] == [0, 1, 2, 3]

    decoded.clear()
    answers[10.0] = [ts, *word, ts + 100, *word]  # cut by the token cap inside a segment: closes at the chunk's end
    result = transcribe_chunked(model, np.zeros(200_000, dtype=np.float32), language="en", temperature=0.0)
    assert decoded == [10.0] and result["segments"][-1]["end"] == 11.0

    # Two chunks, each leaving 6 s: their tails are packed into one 12-s chunk, its segments mapped to each tail.
    decoded.clear()
    second = SpeechChunk(((192_000, 352_000),))  # 12-22 s of the recording
    monkeypatch.setattr(longform, "speech_chunks", lambda audio: [chunk, second])
    answers[10.0] = [ts, *word, ts + 100, ts + 100, *word, ts + 200]
    answers[12.0] = [ts, *word, ts + 300, ts + 300, *word, ts + 590]
    result = transcribe_chunked(model, np.zeros(400_000, dtype=np.float32), language="en", temperature=0.0)
    assert decoded == [10.0, 10.0, 12.0]
    assert [(s["start"], s["end"]) for s in result["segments"]] == [
        (1.0, 3.0), (3.0, 5.0), (5.0, 11.0), (12.0, 14.0), (14.0, 16.0), (16.0, 21.8)
    ]  # fmt: skip
    monkeypatch.setattr(longform, "speech_chunks", lambda audio: [chunk])

    decoded.clear()
    monkeypatch.setattr(longform, "MAX_TAIL_PASSES", 1)
    transcribe_chunked(model, np.zeros(200_000, dtype=np.float32), language="en", temperature=0.0)
    assert decoded == [10.0, 6.0]


def test_the_chunks_and_tails_of_several_recordings_share_batches(monkeypatch):
    """Chunks of different recordings are decoded side by side (longest first), so are their tails, and each
    recording's segments are what it gets alone; recordings of different languages never share a batch."""
    tokenizer = get_tokenizer(False)
    ts, word = tokenizer.timestamp_begin, tokenizer.encode(" hello")
    first, second = SpeechChunk(((16_000, 176_000),)), SpeechChunk(((32_000, 160_000),))  # 10 s at 1 s, 8 s at 2 s
    monkeypatch.setattr(longform, "speech_chunks", lambda audio: [first] if len(audio) == 200_000 else [second])
    answers = {
        10.0: [ts, *word, ts + 200],  # ends at 4 s: a 6-s tail
        8.0: [ts, *word, ts + 150],  # ends at 3 s: a 5-s tail
        6.0: [ts, *word, ts + 300],
        5.0: [ts, *word, ts + 250],
    }
    calls = []

    def window_holding_its_duration(audio, n_mels):
        return torch.full((n_mels, 3000), len(audio) / SAMPLE_RATE), len(audio) // 160

    def fake_decode(model, mels, language, options):
        calls.append([round(float(mel[0, 0]), 1) for mel in mels])
        return [DecodingResult(audio_features=None, language=language, tokens=answers[d]) for d in calls[-1]]

    monkeypatch.setattr(longform, "first_transcription_window", window_holding_its_duration)
    monkeypatch.setattr(longform, "_decode_with_fallback", fake_decode)
    model = whisper_rope.build_model(small_dims(), "whisper")
    recordings = [np.zeros(200_000, dtype=np.float32), np.zeros(300_000, dtype=np.float32)]
    options = dict(language="en", temperature=0.0)
    results = transcribe_recordings(model, recordings, batch_size=8, **options)
    assert calls == [[10.0, 8.0], [6.0, 5.0]]  # two decodes for two recordings and their tails (was four)
    assert [(s["start"], s["end"]) for s in results[0]["segments"]] == [(1.0, 5.0), (5.0, 11.0)]
    assert [(s["start"], s["end"]) for s in results[1]["segments"]] == [(2.0, 5.0), (5.0, 10.0)]
    for recording, together in zip(recordings, results):
        assert transcribe_chunked(model, recording, **options) == together

    calls.clear()
    transcribe_recordings(model, recordings, batch_size=1, **options)
    assert calls == [[10.0], [8.0], [6.0], [5.0]]

    calls.clear()
    monkeypatch.setattr(longform, "_language", lambda model, audio, chunks, options: "de" if len(audio) > 2e5 else "en")
    results = transcribe_recordings(model, recordings, batch_size=8, temperature=0.0)
    assert calls == [[10.0], [8.0], [6.0], [5.0]] and [r["language"] for r in results] == ["en", "de"]


def test_tails_from_far_apart_chunks_share_a_window_but_never_a_segment(monkeypatch):
    """The tails of chunks at 1-11, 100-110 and 200-210 s are packed into one 18-s chunk with breaks at 6 and 12 s
    of it. A segment the decoder runs across a break is split there by its words' alignment (each piece timed inside
    the tail it was spoken in), or, when all its words lie on one side, kept whole on that side."""
    tokenizer = get_tokenizer(False)
    ts = tokenizer.timestamp_begin
    hello, world, again = (tokenizer.encode(f" {word}") for word in ("hello", "world", "again"))
    chunks = [SpeechChunk(((start, start + 160_000),)) for start in (16_000, 1_600_000, 3_200_000)]
    monkeypatch.setattr(longform, "speech_chunks", lambda audio: chunks)
    answers = {
        10.0: [ts, *hello, ts + 200],  # each chunk's text ends at 4 s of 10: tails at 5-11, 104-110 and 204-210 s
        18.0: [ts, *hello, ts + 200]  # the packed tails: inside the first tail,
        + [ts + 200, *world, *again, ts + 400]  # across the first break (at 6 s),
        + [ts + 400, *hello, ts + 580]  # inside the second tail,
        + [ts + 585, *hello, *world, ts + 850],  # from 0.3 s before the second break (at 12 s)
    }
    decoded = []

    def window_holding_its_duration(audio, n_mels):
        return torch.full((n_mels, 3000), len(audio) / SAMPLE_RATE), len(audio) // 160

    def fake_decode(model, mels, language, options):
        decoded.append([round(float(mel[0, 0]), 1) for mel in mels])
        return [DecodingResult(audio_features=None, language="en", tokens=answers[d]) for d in decoded[-1]]

    # The packed chunk's words (start s, end s): "world" ends the first tail, "again" begins the second.
    word_times = [(1.5, 2.5), (5.0, 6.0), (6.5, 7.5), (9.0, 10.0), (12.5, 13.0), (14.0, 16.0)]

    def fake_alignment(model, tokenizer, text_tokens, mel, num_frames):
        words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
        return [WordTiming(w, t, *times, 0.9) for w, t, times in zip(words, word_tokens, word_times)]

    monkeypatch.setattr(longform, "first_transcription_window", window_holding_its_duration)
    monkeypatch.setattr(longform, "_decode_with_fallback", fake_decode)
    monkeypatch.setattr(longform, "find_alignment", fake_alignment)
    model = whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper").eval()
    audio = np.zeros(3_400_000, dtype=np.float32)
    result = transcribe_chunked(model, audio, language="en", temperature=0.0)
    assert decoded == [[10.0, 10.0, 10.0], [18.0]]  # the three tails share one window
    assert [(s["start"], s["end"], s["text"]) for s in result["segments"]] == [
        (1.0, 5.0, " hello"),
        (5.0, 9.0, " hello"),
        (9.0, 11.0, " world"),  # the segment across the first break, split there: its first word
        (100.0, 104.0, " hello"),
        (104.0, 106.0, " again"),  # and its second, in the second tail
        (106.0, 109.6, " hello"),
        (200.0, 204.0, " hello"),
        (204.0, 209.0, " hello world"),  # not from 109.7 s: none of its words is in the second tail
    ]
    split = [s for s in result["segments"] if s["text"] in (" world", " again")]
    assert [s["tokens"] for s in split] == [[ts + 200, *world, ts + 300], [ts + 300, *again, ts + 400]]

    # With the model's own alignment (random here) and word timestamps, every segment and word still lies inside
    # the chunk or tail it was decoded from.
    monkeypatch.setattr(longform, "find_alignment", find_alignment)
    result = transcribe_chunked(model, audio, language="en", temperature=0.0, word_timestamps=True)
    assert sorted("".join(s["text"] for s in result["segments"]).split()) == sorted(
        "hello hello hello hello world again hello hello world".split()
    )
    for segment in result["segments"]:
        start = next(s for s in (1.0, 100.0, 200.0) if s <= segment["start"] <= s + 10.0)
        assert segment["end"] <= start + 10.0, segment
        assert all(start <= w["start"] <= w["end"] <= start + 10.0 for w in segment["words"]), segment


def test_a_segment_that_starts_in_the_silence_before_a_break_starts_after_it():
    """On the benchmark's 285-s recording, tails at 27.99-31.53 s and 189.38-193.22 s shared a window, and "If the
    station is frozen..." (spoken at 190 s) was decoded from 0.02 s before their seam: it came out as one segment
    from 31.5 to 193.2 s. A start in the last `SPEECH_PAD_S` of a part (silence after its speech) is moved to the
    next part without aligning words; a segment that only touches one part, or a chunk of one part, is unchanged."""
    tokenizer = get_tokenizer(False)
    ts, text = tokenizer.timestamp_begin, tokenizer.encode(" If the station is frozen")
    chunk = SpeechChunk(((447_840, 504_480), (3_030_080, 3_091_520)), breaks=(1,))
    parts = chunk.parts()
    assert parts == [(0.0, 3.54), (3.54, 7.38)]
    segment = (3.52, 7.36, [ts + 176, *text, ts + 368])

    def no_alignment():
        raise AssertionError("no word alignment is needed")

    assert split_at_breaks([segment], tokenizer, parts, no_alignment) == [(3.54, 7.36, segment[2])]
    assert chunk.recording_time(3.54) == 189.38
    inside = [(0.0, 3.4, [ts, *text, ts + 170]), (3.54, 7.36, segment[2])]
    assert split_at_breaks(inside, tokenizer, parts, no_alignment) == inside
    assert split_at_breaks([segment], tokenizer, [(0.0, 7.38)], no_alignment) == [segment]
    # 0.3 s before the seam its words decide; without any, the part that holds most of the segment.
    early = (3.24, 7.36, [ts + 162, *text, ts + 368])
    assert split_at_breaks([early], tokenizer, parts, list) == [(3.54, 7.36, early[2])]
    assert split_at_breaks([(3.24, 3.64, early[2])], tokenizer, parts, list) == [(3.24, 3.54, early[2])]


def test_the_alignment_that_splits_a_segment_reuses_the_decode_s_encoder_output(speech):
    """`longform._alignment` runs only the decoder on the features the decode made: the word timings of upstream's
    `find_alignment` of the model, which encodes the window again."""
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper")).eval()
    tokenizer = get_tokenizer(False)
    window = first_transcription_window(speech[0], model.dims.n_mels)
    mel, n_frames = window
    text = tokenizer.encode(" hello world, how are you")
    with torch.no_grad():
        features = model.encoder(mel[None])[0]
    encoder_calls = []
    hook = model.encoder.register_forward_hook(lambda module, args, output: encoder_calls.append(1))
    try:
        reused = longform._alignment(
            model, tokenizer, text, DecodingResult(audio_features=features, language="en"), window
        )
    finally:
        hook.remove()
    assert encoder_calls == []
    expected = find_alignment(model, tokenizer, text, mel, n_frames)
    # The same words and times; the probabilities to float rounding (the decode's encoder ran with SDPA, the
    # alignment's without).
    assert len(expected) == 6
    assert [(w.word, w.tokens, w.start, w.end) for w in reused] == [
        (w.word, w.tokens, w.start, w.end) for w in expected
    ]
    assert [w.probability for w in reused] == pytest.approx([w.probability for w in expected], rel=1e-4)


def test_split_at_timestamps_turns_timestamp_pairs_into_segments():
    tokenizer = get_tokenizer(False)
    ts = tokenizer.timestamp_begin
    text = tokenizer.encode(" hello")
    tokens = [ts, *text, ts + 50, ts + 50, *text, ts + 120, *text]  # the last segment is cut by the token cap
    segments = split_at_timestamps(tokens, tokenizer, duration=5.0)
    assert [(start, end) for start, end, _ in segments] == [(0.0, 1.0), (1.0, 2.4), (2.4, 5.0)]
    assert segments[0][2] == [ts, *text, ts + 50]
    assert split_at_timestamps(text, tokenizer, duration=3.0) == [(0.0, 3.0, text)]
    assert split_at_timestamps([ts + 400, *text, ts + 500], tokenizer, duration=3.0) == [
        (3.0, 3.0, [ts + 400, *text, ts + 500])
    ]


def test_real_tiny_en_long_recording_in_batches_gives_timed_sentences(tmp_path):
    audio, placed = _recording()
    model = whisper_rope.load_model("tiny.en", device="cpu", compute_type="int8")
    result = transcribe_many(model, [audio], batch_size=4, fp16=False, temperature=0.0, word_timestamps=True)[0]
    words = normalise(result["text"]).split()
    expected = normalise(" ".join(text for *_, text in placed)).split()
    import jiwer

    assert jiwer.wer(" ".join(expected), " ".join(words)) < 0.15
    segments = result["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    assert all(a["start"] <= b["start"] for a, b in zip(segments, segments[1:]))
    # Each sentence starts a segment near its place in the recording (not in its chunk: sentences are 4.5 s apart).
    # Word alignment may start a sentence up to 2 s early when a seam (removed silence) precedes it in its chunk.
    for start, _, text in placed[1:]:
        first_word = normalise(text).split()[0]
        near = [s for s in segments if abs(s["start"] - start) < 2.0 and normalise(s["text"]).startswith(first_word)]
        assert near, (start, text)
    assert segments[-1]["end"] <= len(audio) / SAMPLE_RATE
    for segment in segments:
        assert all(segment["start"] - 0.5 <= w["start"] <= w["end"] <= segment["end"] + 0.5 for w in segment["words"])


def test_cli_batch_size_writes_every_format_on_the_recording_timeline(tmp_path):
    import soundfile

    audio, placed = _recording(gap_s=2.0)
    path = tmp_path / "long.wav"
    soundfile.write(path, audio[: 35 * SAMPLE_RATE], SAMPLE_RATE)
    status = cli.main(
        ["--model", "tiny.en", "--device", "cpu", "--compute_type", "int8", "--fp16", "False", "--batch_size", "4"]
        + ["--temperature", "0", "--temperature_increment_on_fallback", "None", "--verbose", "False"]
        + ["--output_dir", str(tmp_path / "out"), str(path)]
    )
    assert status == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".whisper-rope-outputs.json"] + [
        f"long{suffix}" for suffix in (".json", ".srt", ".tsv", ".txt", ".vtt")
    ]  # the transcripts, and the record of what transcribe wrote
    segments = json.loads((out / "long.json").read_text())["segments"]
    last = [p for p in placed if p[0] < 33][-1]  # the last sentence that starts in the 35 s
    assert any(abs(s["start"] - last[0]) < 1.0 for s in segments), (last, [s["start"] for s in segments])
    assert "-->" in (out / "long.srt").read_text()


def test_an_unpadded_encoder_encodes_each_chunk_at_its_own_length():
    dims = small_dims(n_audio_ctx=1500)
    model = whisper_rope.build_model(dims, "rotary").eval()
    model.unpadded = True
    audio, placed = _recording()
    audio = audio[: int(placed[12][0] * SAMPLE_RATE)]  # twelve sentences (~35 s of speech): two chunks
    lengths = []
    hook = model.encoder.conv1.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[-1]))
    try:
        result = transcribe_chunked(model, audio, batch_size=1, fp16=False, temperature=0.0, sample_len=3)
    finally:
        hook.remove()
    # One encoder call per chunk, each cut to that chunk's frames (never the 3000-frame window).
    assert len(lengths) == 2 and all(n < 3000 for n in lengths) and lengths[0] != lengths[1]
    assert result["language"] == "en"
