"""Training windows of every length (whisper_rope.data.windows): what they hold, how their lengths spread, and how
long recordings are cut."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import soundfile
from whisper.audio import SAMPLE_RATE

from whisper_rope.audio import load_audio
from whisper_rope.data import (
    CUT_REACH_SECONDS,
    PART_MAX_SECONDS,
    Example,
    WindowPlan,
    compose_windows,
    quiet_cut,
    split_point,
    window_audio,
    window_halves,
    window_seconds,
    with_previous_text,
)

from .conftest import ROWS, SPEECH


def _clips(durations, texts=None):
    texts = texts or [f"clip {i}" for i in range(len(durations))]
    return [
        Example(audio=f"/clips/{i}.flac", text=t, row=i + 1, duration=d)
        for i, (d, t) in enumerate(zip(durations, texts))
    ]


def _fixture_clips():
    clips = []
    for i, row in enumerate(ROWS):
        path = SPEECH / row["audio"]
        seconds = len(load_audio(path)) / SAMPLE_RATE
        clips.append(Example(audio=str(path), text=row["text"], row=i + 1, duration=seconds))
    return clips


def test_a_window_holds_its_clips_audio_in_order_with_silent_pauses():
    clips = _fixture_clips()
    windows = compose_windows(clips, WindowPlan(single_share=0.0, sets=1), seed=0)
    joined = max(windows, key=lambda w: len(w.pieces))
    assert len(joined.pieces) >= 3
    audio = window_audio(joined)
    position = 0
    for i, piece in enumerate(joined.pieces):
        if i:  # the pause is silence of the drawn length
            pause = round(joined.pauses[i - 1] * SAMPLE_RATE)
            assert 0.2 * SAMPLE_RATE <= pause <= 1.5 * SAMPLE_RATE
            assert not audio[position : position + pause].any()
            position += pause
        clip = load_audio(piece.audio)
        np.testing.assert_array_equal(audio[position : position + len(clip)], clip)
        position += len(clip)
    assert position == len(audio)
    assert abs(joined.duration - len(audio) / SAMPLE_RATE) < 0.01
    by_path = {str(SPEECH / row["audio"]): row["text"] for row in ROWS}
    assert joined.text == " ".join(by_path[piece.audio] for piece in joined.pieces)


def test_each_set_uses_every_clip_once_and_is_the_same_for_the_same_seed():
    clips = _clips(np.random.default_rng(0).uniform(2, 6, 300))
    plan = WindowPlan(sets=3)
    windows = compose_windows(clips, plan, seed=5)
    assert windows == compose_windows(clips, plan, seed=5)
    assert windows != compose_windows(clips, plan, seed=6)
    uses = Counter(piece.audio for w in windows for piece in w.pieces)
    assert set(uses.values()) == {3} and len(uses) == 300
    assert all(w.duration <= 30.0 for w in windows)
    assert all(abs(w.duration - sum(p.seconds for p in w.pieces) - sum(w.pauses)) < 1e-9 for w in windows)


def test_lengths_cover_one_to_thirty_seconds_about_evenly():
    clips = _clips(np.random.default_rng(1).uniform(2, 6, 2000))
    windows = compose_windows(clips, WindowPlan(sets=1), seed=0)
    lengths = np.array([w.duration for w in windows])
    counts = np.histogram(lengths, bins=[0, 5, 10, 15, 20, 25, 30])[0]
    assert counts.min() > 0.5 * counts.mean(), counts  # no band of lengths starved
    assert lengths.max() > 27 and lengths.min() < 3
    assert window_seconds(windows) == (lengths.min(), lengths.max())
    singles = sum(len(w.pieces) == 1 for w in windows) / len(windows)
    assert 0.15 <= singles <= 0.5  # the drawn single-clip share plus targets shorter than the next clip
    # joining only while under the drawn length (the benchmark's fixed sets) starves the longest band
    under = compose_windows(clips, WindowPlan(sets=1, centred=False), seed=0)
    top = [sum(25 < w.duration <= 30 for w in ws) / len(ws) for ws in (windows, under)]
    assert top[0] > 1.2 * top[1], top


def test_the_single_clip_share_and_the_timestamp_share_are_honoured():
    clips = _clips(np.random.default_rng(2).uniform(2, 6, 600))
    only_singles = compose_windows(clips, WindowPlan(single_share=1.0, timestamp_share=0.0, sets=1), seed=0)
    assert len(only_singles) == 600 and not any(w.timestamps for w in only_singles)
    stamped = compose_windows(clips, WindowPlan(timestamp_share=0.5, sets=1), seed=0)
    share = sum(w.timestamps for w in stamped) / len(stamped)
    assert 0.35 < share < 0.65
    without = compose_windows(clips, WindowPlan(timestamp_share=1.0, sets=1), seed=0, allow_timestamps=False)
    assert not any(w.timestamps for w in without)


def test_clips_of_other_languages_or_with_a_prompt_are_never_joined():
    clips = _clips([3.0] * 40)
    clips = [
        Example(**{**c.__dict__, "language": "de" if i % 2 else "en", "prompt": "a prompt" if i % 5 == 0 else None})
        for i, c in enumerate(clips)
    ]
    for window in compose_windows(clips, WindowPlan(single_share=0.0, sets=2), seed=0):
        members = [clips[int(piece.audio.split("/")[-1].split(".")[0])] for piece in window.pieces]
        assert len({m.language for m in members}) == 1
        assert len(members) == 1 or not any(m.prompt for m in members)


def test_a_long_recording_is_cut_at_its_pauses_into_consecutive_windows(tmp_path):
    # 3-s bursts of tone with 1-s pauses: 100 s in all.
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    audio = np.concatenate([np.concatenate([tone, np.zeros(SAMPLE_RATE, np.float32)]) for _ in range(25)])
    path = tmp_path / "long.wav"
    soundfile.write(path, audio, SAMPLE_RATE)
    spans = [(4 * i * SAMPLE_RATE, (4 * i + 3) * SAMPLE_RATE) for i in range(25)]
    recording = Example(audio=str(path), text=None, row=1, duration=100.0)
    windows = compose_windows([recording], WindowPlan(sets=1), seed=0, find_spans=lambda a: spans)
    assert len(windows) >= 4
    for window, following in zip(windows, windows[1:]):
        assert window.end == pytest.approx(following.start)  # consecutive, nothing lost
        cut = window.end % 4  # each cut lies inside a pause (3..4 s of every 4-s period)
        assert 3.0 <= cut <= 4.0 or cut == pytest.approx(0.0, abs=1e-9)
    assert windows[0].start == 0.0 and windows[-1].end == pytest.approx(99.0)
    assert all(w.duration <= 30.0 for w in windows)
    first = window_audio(windows[0])
    np.testing.assert_array_equal(first, load_audio(path)[: len(first)])


def test_windows_past_thirty_seconds_split_at_a_pause_near_their_middle():
    clips = _clips(np.random.default_rng(2).uniform(2, 6, 600))
    windows = compose_windows(clips, WindowPlan(max_seconds=45.0, sets=1), seed=0)
    long = [w for w in windows if w.duration > 30.0]
    assert len(long) > 0.2 * len(windows) and max(w.duration for w in windows) <= 45.0
    assert all((w.split is None) == (w.duration <= 30.0) for w in windows)
    for window in long:
        assert window.split <= 30.0 and window.duration - window.split <= 30.0
        # the split is the middle of one of the window's pauses: a clip boundary
        elapsed = np.cumsum([p.seconds for p in window.pieces][:-1]) + np.cumsum((0.0,) + window.pauses[:-1])
        middles = elapsed + np.array(window.pauses) / 2
        assert np.min(np.abs(middles - window.split)) < 1e-9
        assert abs(window.split - window.duration / 2) <= 3.5  # the pause nearest the middle (clips of 2-6 s)
    assert split_point([25.0, 5.0, 25.0], [1.0, 1.0]) is None  # no pause leaves both halves within 30 s
    assert split_point([20.0, 15.0], [1.0]) == 20.5
    with pytest.raises(ValueError, match="window lengths must lie in 0..60 s"):
        WindowPlan(max_seconds=61.0)


def test_a_split_windows_audio_passes_thirty_seconds_and_its_halves_join_to_it():
    clips = _fixture_clips() * 6
    clips = [Example(audio=c.audio, text=c.text, row=i + 1, duration=c.duration) for i, c in enumerate(clips)]
    windows = compose_windows(clips, WindowPlan(min_seconds=35.0, max_seconds=40.0, single_share=0.0, sets=1), seed=0)
    window = max(windows, key=lambda w: w.duration)
    assert window.duration > 30.0 and window.split is not None
    audio = window_audio(window)
    assert abs(len(audio) / SAMPLE_RATE - window.duration) < 0.01
    first, second = window_halves(window, audio)
    assert len(first) == round(window.split * SAMPLE_RATE) and len(first) + len(second) == len(audio)
    np.testing.assert_array_equal(np.concatenate([first, second]), audio)
    assert not first[-SAMPLE_RATE // 10 :].any() and not second[: SAMPLE_RATE // 10].any()  # cut inside a pause


def test_recordings_are_still_cut_into_windows_of_at_most_thirty_seconds_under_a_longer_plan(tmp_path):
    spans = [(4 * i * SAMPLE_RATE, (4 * i + 3) * SAMPLE_RATE) for i in range(25)]
    recording = Example(audio=str(tmp_path / "r.wav"), text=None, row=1, duration=100.0)
    soundfile.write(recording.audio, np.zeros(100 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    windows = compose_windows([recording], WindowPlan(max_seconds=60.0, sets=1), seed=0, find_spans=lambda a: spans)
    assert all(w.duration <= 30.0 and w.split is None for w in windows)


def _tone_with_gaps(path, seconds, gaps):
    """A 220-Hz tone of ``seconds`` with silence over each (start, end) of ``gaps``, written to ``path``."""
    audio = 0.3 * np.sin(2 * np.pi * 220 * np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE).astype(np.float32)
    for start, end in gaps:
        audio[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)] = 0.0
    soundfile.write(path, audio, SAMPLE_RATE)
    return audio


def test_a_part_is_cut_at_the_quietest_point_near_the_drawn_length(tmp_path):
    _tone_with_gaps(tmp_path / "gaps.wav", 5.0, [(1.8, 2.0), (3.4, 3.5)])
    clip = Example(audio=str(tmp_path / "gaps.wav"), text="t", row=1, duration=5.0)
    assert 1.8 <= quiet_cut(clip, 2.1) <= 2.0
    assert 3.4 <= quiet_cut(clip, 3.3) <= 3.5
    # an undecodable clip is cut at the drawn length: its window's decoding reports the file
    assert quiet_cut(Example(audio=str(tmp_path / "missing.wav"), text="t", row=2, duration=5.0), 2.1) == 2.1


def test_parts_of_clips_hold_their_clips_audio_and_no_text_and_cover_lengths_under_the_shortest_clip(tmp_path):
    clips = []
    for i in range(40):
        path = tmp_path / f"{i}.wav"
        _tone_with_gaps(path, 4.0 + i % 3, [(1.0 + 0.1 * (i % 10), 1.2 + 0.1 * (i % 10))])
        clips.append(Example(audio=str(path), text=f"clip {i}", row=i + 1, duration=4.0 + i % 3))
    windows = compose_windows(clips, WindowPlan(part_share=0.5, sets=1), seed=3)
    parts = [w for w in windows if w.text is None]
    assert 10 <= len(parts) <= 30 and all(len(w.pieces) == 1 for w in parts)
    assert Counter(p.audio for w in windows for p in w.pieces) == Counter(c.audio for c in clips)  # each clip once
    for window in parts:
        piece = window.pieces[0]
        whole = load_audio(piece.audio)
        assert 1.0 - CUT_REACH_SECONDS <= window.duration <= PART_MAX_SECONDS + CUT_REACH_SECONDS
        assert piece.start == 0.0 or piece.end == pytest.approx(len(whole) / SAMPLE_RATE)  # a first or last part
        audio = window_audio(window)
        np.testing.assert_array_equal(audio, whole[round(piece.start * SAMPLE_RATE) : round(piece.end * SAMPLE_RATE)])
    assert min(w.duration for w in parts) < 2.0 < min(c.duration for c in clips)
    assert compose_windows(clips, WindowPlan(part_share=0.5, sets=1), seed=3) == windows  # deterministic
    # targets that are the clips' own transcripts have no part to label
    labelled = compose_windows(clips, WindowPlan(part_share=0.5, sets=1), seed=3, allow_timestamps=False)
    assert all(w.text is not None for w in labelled)


def test_a_share_of_windows_follows_an_earlier_window_and_the_compositions_stay_the_same():
    clips = _clips(np.random.default_rng(4).uniform(2, 6, 400))
    plain = compose_windows(clips, WindowPlan(previous_share=0.0, sets=2), seed=1)
    marked = compose_windows(clips, WindowPlan(previous_share=0.3, sets=2), seed=1)
    assert [replace(w, after=None) for w in marked] == plain  # same windows, same timestamp draws
    assert not any(w.after is not None for w in plain)
    following = [i for i, w in enumerate(marked) if w.after is not None]
    assert 0.2 < len(following) / len(marked) < 0.4
    first_set = len(compose_windows(clips, WindowPlan(previous_share=0.0, sets=1), seed=1))
    for i in following:
        assert marked[i].after < i and marked[marked[i].after].after is None  # an earlier window that follows none
        assert (marked[i].after < first_set) == (i < first_set)  # of its own set
    # windows over 30 s (read half by half) and labelled targets never follow one
    longer = compose_windows(clips, WindowPlan(max_seconds=45.0, previous_share=1.0, sets=1), seed=1)
    assert all(w.after is None for w in longer if w.split is not None)
    assert any(w.after is not None for w in longer)
    labelled = compose_windows(clips, WindowPlan(previous_share=1.0, sets=1), seed=1, allow_timestamps=False)
    assert all(w.after is None for w in labelled)


def test_a_share_of_windows_without_timestamps_branches_and_the_compositions_stay_the_same():
    clips = _clips(np.random.default_rng(5).uniform(2, 6, 400))
    plain = compose_windows(clips, WindowPlan(sets=2), seed=3)
    branched = compose_windows(clips, WindowPlan(branch_share=0.5, sets=2), seed=3)
    assert [replace(w, branch=None) for w in branched] == plain  # same windows, timestamps and previous texts
    assert all(w.branch is None for w in plain)
    followed = {w.after for w in branched if w.after is not None}
    eligible = [i for i, w in enumerate(branched) if not w.timestamps and i not in followed]
    marked = [i for i, w in enumerate(branched) if w.branch is not None]
    assert set(marked) <= set(eligible)  # never a window with timestamp targets, nor one whose text is a prompt
    assert 0.35 < len(marked) / len(eligible) < 0.65
    assert all(0.0 <= branched[i].branch < 1.0 for i in marked)
    assert len({round(branched[i].branch, 2) for i in marked}) > 20  # drawn all along the text
    assert compose_windows(clips, WindowPlan(branch_share=0.5, sets=2), seed=3) == branched
    labelled = compose_windows(clips, WindowPlan(branch_share=1.0, sets=1), seed=3, allow_timestamps=False)
    assert all(w.branch is None for w in labelled)  # a reference transcript has no second choice to take
    first = compose_windows(clips, WindowPlan(branch_share=0.5, branch_first_share=0.5, sets=2), seed=3)
    at_first = [i for i, w in enumerate(first) if w.branch == 0.0]
    assert [w.branch is None for w in first] == [w.branch is None for w in branched]  # the same windows branch
    assert 0.35 < len(at_first) / len(marked) < 0.65  # half of them at the first word
    assert all(first[i].branch == branched[i].branch for i in marked if i not in at_first)  # the rest where they were


def test_with_previous_text_gives_each_following_window_its_predecessors_transcript_as_prompt():
    windows = compose_windows(_clips([3.0] * 30), WindowPlan(previous_share=0.5, single_share=1.0, sets=1), seed=0)
    untranscribed = next(w.after for w in windows if w.after is not None)  # e.g. its audio could not be decoded
    transcripts = {i: f"text of window {i}" for i in range(len(windows)) if i != untranscribed}
    prompted = with_previous_text(windows, transcripts)
    for window, before in zip(prompted, windows):
        expected = transcripts.get(before.after) if before.after is not None else None
        assert window.prompt == expected
        assert replace(window, prompt=None) == before
    assert any(w.prompt for w in prompted) and any(w.after is not None and not w.prompt for w in prompted)
