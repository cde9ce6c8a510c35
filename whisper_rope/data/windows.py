"""Training windows of every length up to 30 s (or 60 s), composed from whatever audio a training folder holds.

A model adapted on one-sentence clips learns "one sentence, then end of text" and drops the rest of a longer input.
So the windows a run trains on are composed to cover 1-30 s about evenly:

* short clips are joined in a shuffled order, with a pause of silence between two clips (`WindowPlan.pause`), until
  the next clip would pass a length drawn uniformly from `WindowPlan.min_seconds`..`max_seconds`; a share of the
  windows (`WindowPlan.single_share`) stays one clip;
* a share of the windows (`WindowPlan.part_share`, untranscribed clips only: the teacher labels them) is a part of
  one clip, its first or last `min_seconds`..`PART_MAX_SECONDS` cut at the quietest point near the drawn length, so
  that inputs shorter than any whole clip (a 1.5-s answer, a chunk cut by a VAD) are trained on too;
* a recording longer than a window is cut inside its pauses (found by the Silero VAD of `speech_chunks`) into
  consecutive windows of drawn lengths.

A plan whose `WindowPlan.max_seconds` passes 30 s (students whose encoder adds no table: nothing else reads such a
window) joins clips into windows of up to 60 s, each of which records where it splits into two halves of at most
30 s (`Window.split`: the middle of the pause between two clips nearest the window's middle), so that a teacher
that reads 30 s at a time can transcribe it half by half (`window_halves`). A clip joined only if the window stays
splittable; recordings are still cut into windows of at most 30 s.

Each window also draws whether its targets carry timestamp tokens (`WindowPlan.timestamp_share`): upstream's
``transcribe`` decodes with timestamps by default and seeks on them, evaluation and short clips decode without.
And a share of the windows (`WindowPlan.previous_share`, teacher-labelled windows of at most 30 s) is decoded after
the transcript of the window before it (`Window.after`, filled in by `with_previous_text` once the teacher has
written it) as a ``<|startofprev|>`` prompt: upstream's loop conditions every window after the first on the text
before it, and a student never trained so can fall into repeating a sentence there.

A share of the teacher-labelled windows without timestamps (`WindowPlan.branch_share`) is *branched*: the teacher's
transcript takes, at one drawn text token (`Window.branch`, the fraction of the way through its text; the first word
for a share `WindowPlan.branch_first_share` of them), the teacher's second choice instead of its first, and goes on
as the teacher decodes after that word (`TeacherCache`). Trained only on the teacher's own greedy path, a student
never sees a prefix that went wrong, and can loop after one where the teacher recovers (docs/results.md,
"Recovering from a wrong word"). Windows another window follows keep their own transcript (it is that window's
prompt).

A plan is a pure function of the clips, the seed and the set index (`compose_windows`), so the teacher's targets of
a window, cached under its audio, are computed once and read in every later epoch and run. Several sets
(`WindowPlan.sets`) give the same clips in other combinations.

Units: seconds for lengths and pauses; audio (n_samples,) float32 at 16 kHz.
"""

import logging
import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from whisper.audio import N_SAMPLES, SAMPLE_RATE

from ..audio import load_audio
from ..errors import AudioError
from ..transcription.speech_chunks import speech_spans
from .manifest import MAX_CLIP_SECONDS, Example

#: The longest training window (seconds): two teacher windows of 30 s, joined at a pause.
MAX_WINDOW_SECONDS = 2 * MAX_CLIP_SECONDS

#: The longest part of a clip that stands as a window of its own (seconds): clips of 2-6 s leave 1-3 s uncovered.
PART_MAX_SECONDS = 3.0

#: How far from the drawn length a part's cut may move to reach a quiet point (seconds), and what is left over at
#: least (a clip shorter than the drawn length plus this stays whole).
CUT_REACH_SECONDS = 0.3

logger = logging.getLogger("whisper_rope")


@dataclass(frozen=True)
class Piece:
    """A stretch of one audio file: ``start``/``end`` seconds into it (None: from the start / to the end)."""

    audio: str
    start: Optional[float]
    end: Optional[float]
    seconds: float


@dataclass(frozen=True)
class Window(Example):
    """An `Example` whose audio is ``pieces`` joined with ``pauses`` seconds of silence between them (one pause
    fewer than pieces). ``audio``, ``row`` and ``language`` are the first piece's; ``text`` the pieces' texts
    joined in order (None when any is untranscribed); ``timestamps``: its targets carry timestamp tokens;
    ``split``: for a window over 30 s, the seconds into it where its second half (at most 30 s, as the first)
    begins, in the middle of a pause; None otherwise. ``after``: the index (in `compose_windows`' list) of the
    window whose transcript becomes this window's prompt (`with_previous_text`); None: no such prompt.
    ``branch``: for a branched window, where in its text (0..1) the teacher's transcript takes its second choice;
    None: the teacher's greedy transcript."""

    pieces: Tuple[Piece, ...] = ()
    pauses: Tuple[float, ...] = ()
    timestamps: bool = False
    split: Optional[float] = None
    after: Optional[int] = None
    branch: Optional[float] = None


@dataclass(frozen=True)
class WindowPlan:
    """How windows are drawn. Lengths in seconds; shares in 0..1. ``centred``: a clip joins a window while that
    brings it nearer its drawn length (False: only while the window stays within it, which leaves the longest
    lengths rarer; the fixed evaluation sets of ``benchmarks/length_buckets.py`` were composed so)."""

    min_seconds: float = 1.0
    max_seconds: float = MAX_CLIP_SECONDS
    single_share: float = 0.15
    part_share: float = 0.08
    pause: Tuple[float, float] = (0.2, 1.5)
    timestamp_share: float = 0.5
    previous_share: float = 0.3
    sets: int = 2
    centred: bool = True
    branch_share: float = 0.0
    branch_first_share: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            (
                0 < self.min_seconds <= self.max_seconds <= MAX_WINDOW_SECONDS,
                f"window lengths must lie in 0..{MAX_WINDOW_SECONDS:g} s",
            ),
            (0 <= self.single_share <= 1, "the share of single-clip windows must lie in 0..1"),
            (0 <= self.part_share <= 1, "the share of windows that are part of a clip must lie in 0..1"),
            (0 <= self.pause[0] <= self.pause[1], "pauses must be non-negative, shortest first"),
            (0 <= self.timestamp_share <= 1, "the share of windows with timestamp targets must lie in 0..1"),
            (0 <= self.previous_share <= 1, "the share of windows after a previous text must lie in 0..1"),
            (0 <= self.branch_share <= 1, "the share of branched windows must lie in 0..1"),
            (0 <= self.branch_first_share <= 1, "the share of branches at the first word must lie in 0..1"),
            (self.sets >= 1, "at least one set of windows is needed"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")


#: Finds the speech of a recording: (n_samples,) audio -> (start, end) sample spans in order.
SpanFinder = Callable[[np.ndarray], List[Tuple[int, int]]]

#: Where to cut a clip near a length: (clip, seconds into it) -> the seconds into it of the cut.
CutFinder = Callable[[Example, float], float]


def compose_windows(
    examples: Sequence[Example],
    plan: WindowPlan,
    seed: int,
    allow_timestamps: bool = True,
    find_spans: Optional[SpanFinder] = None,
    find_cut: Optional[CutFinder] = None,
) -> List[Window]:
    """Every set of windows of ``examples`` (each with ``duration`` filled, as `check_audio` does), set after set.

    Clips of at most ``plan.max_seconds`` are joined; longer ones are cut at the spans ``find_spans`` returns
    (default: `speech_chunks.speech_spans`). Clips of different languages or with a prompt are never joined.
    ``allow_timestamps`` False gives every window targets without timestamps (e.g. reference transcripts, which
    have none) and no parts of clips (a part's text is unknown). ``find_cut`` (default `quiet_cut`) places the cut
    of a part.
    """
    joined_limit = min(plan.max_seconds, MAX_CLIP_SECONDS)  # a clip over 30 s has no pause to split at: cut it
    short = [e for e in examples if (e.duration or 0.0) <= joined_limit]
    long = [e for e in examples if (e.duration or 0.0) > joined_limit]
    cut_plan = replace(plan, min_seconds=min(plan.min_seconds, joined_limit), max_seconds=joined_limit)
    cuts = _recording_spans(long, find_spans) if long else {}
    windows: List[Window] = []
    for index in range(plan.sets):
        rng = random.Random(f"windows:{seed}:{index}")
        parts = plan.part_share if allow_timestamps else 0.0
        drawn = _joined_clips(short, replace(plan, part_share=parts), rng, find_cut or quiet_cut) + [
            w for e in long for w in _cut_recording(e, cuts[e.row], cut_plan, rng)
        ]
        # A window over 30 s has no timestamp targets: its halves' transcripts are joined without them.
        drawn = [
            replace(w, timestamps=allow_timestamps and rng.random() < plan.timestamp_share and w.split is None)
            for w in drawn
        ]
        # Its own generator: the compositions and timestamp draws stay those of a plan without previous texts.
        previous = plan.previous_share if allow_timestamps else 0.0
        windows += _after_previous(drawn, previous, random.Random(f"previous:{seed}:{index}"), offset=len(windows))
    branched = plan.branch_share if allow_timestamps else 0.0
    if not branched:
        return windows
    # The first-word draws have a generator of their own: without them the branches are those drawn before them.
    draws = (random.Random(f"branch:{seed}"), random.Random(f"branch-first:{seed}"))
    return _branched(windows, branched, plan.branch_first_share, draws)


def with_previous_text(windows: Sequence[Window], transcripts: Dict[int, str]) -> List[Window]:
    """``windows`` with each `Window.after` turned into its prompt: ``transcripts[after]``, the teacher's text of
    that window (a window whose previous text is empty or missing gets no prompt)."""
    return [
        w if w.after is None or not transcripts.get(w.after, "").strip() else replace(w, prompt=transcripts[w.after])
        for w in windows
    ]


def window_audio(window: Window, whole: bool = False) -> np.ndarray:
    """The window's waveform (n_samples,): its pieces decoded and joined with silence, at most 30 s (60 s for a
    window with a `Window.split`; any length when ``whole``, e.g. a recording joined for evaluation). Raises
    `AudioError` when a piece cannot be decoded."""
    parts = []
    for i, piece in enumerate(window.pieces):
        if i:
            parts.append(np.zeros(round(window.pauses[i - 1] * SAMPLE_RATE), dtype=np.float32))
        parts.append(load_audio(piece.audio, start=piece.start, end=piece.end))
    audio = np.concatenate(parts)
    return audio if whole else audio[: N_SAMPLES if window.split is None else 2 * N_SAMPLES]


def window_halves(window: Window, audio: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A split window's waveform (n_samples,) cut at `Window.split`: two waveforms of at most 30 s each."""
    if window.split is None:
        raise ValueError(f"window of {window.duration:.1f} s at row {window.row} has no split: it is one 30-s window")
    cut = round(window.split * SAMPLE_RATE)
    return audio[:cut][:N_SAMPLES], audio[cut:][:N_SAMPLES]


def split_point(durations: Sequence[float], pauses: Sequence[float]) -> Optional[float]:
    """Where clips of ``durations`` joined with ``pauses`` (one fewer) split into two halves of at most 30 s: the
    middle of the pause nearest the window's middle among those that allow it, in seconds; None if none does."""
    length = sum(durations) + sum(pauses)
    best, elapsed = None, 0.0
    for duration, pause in zip(durations, pauses):
        middle = elapsed + duration + pause / 2
        elapsed += duration + pause
        fits = middle <= MAX_CLIP_SECONDS and length - middle <= MAX_CLIP_SECONDS
        if fits and (best is None or abs(middle - length / 2) < abs(best - length / 2)):
            best = middle
    return best


def window_seconds(windows: Sequence[Example]) -> Tuple[float, float]:
    """(shortest, longest) window, in seconds."""
    lengths = [float(w.duration or 0.0) for w in windows]
    return (min(lengths), max(lengths)) if lengths else (0.0, 0.0)


def quiet_cut(clip: Example, seconds: float) -> float:
    """The quietest 20-ms frame's middle within `CUT_REACH_SECONDS` of ``seconds`` into ``clip``'s audio (seconds
    into it); ``seconds`` itself when the audio cannot be decoded (the window's own decoding then reports it)."""
    try:
        audio = load_audio(clip.audio, start=clip.start, end=clip.end)
    except AudioError:
        return seconds
    frame = SAMPLE_RATE // 50
    low = max(0, round((seconds - CUT_REACH_SECONDS) * SAMPLE_RATE) // frame)
    high = min(len(audio) // frame, round((seconds + CUT_REACH_SECONDS) * SAMPLE_RATE) // frame)
    if high <= low:
        return seconds
    frames = audio[low * frame : high * frame].reshape(high - low, frame)
    quietest = low + int(np.argmin(np.square(frames).mean(axis=1)))
    return (quietest + 0.5) * frame / SAMPLE_RATE


def _joined_clips(clips: Sequence[Example], plan: WindowPlan, rng: random.Random, find_cut: CutFinder) -> List[Window]:
    """One pass over ``clips`` in a shuffled order, each clip in exactly one window (whole, or a part of it)."""
    groups: Dict[Tuple[Optional[str], bool], List[Example]] = {}
    for clip in clips:
        groups.setdefault((clip.language, bool(clip.prompt)), []).append(clip)
    windows = []
    for (_, prompted), members in groups.items():
        order = list(members)
        rng.shuffle(order)
        while order:
            if not prompted and plan.part_share > 0 and rng.random() < plan.part_share:
                part = _clip_part(order[-1], plan, rng, find_cut)
                if part is not None:
                    order.pop()
                    windows.append(part)
                    continue
            single = prompted or rng.random() < plan.single_share
            target = rng.uniform(plan.min_seconds, plan.max_seconds)
            taken, pauses = [order.pop()], []
            length = float(taken[0].duration or 0.0)
            while order and not single:
                pause = rng.uniform(*plan.pause)
                joined = length + pause + float(order[-1].duration or 0.0)
                # the clip joins when that brings the window nearer its target: lengths centre on the targets
                # instead of falling short of them (which starved the longest lengths)
                nearer = abs(joined - target) < abs(length - target) if plan.centred else joined <= target
                if not nearer or joined > plan.max_seconds:
                    break
                if not _splittable(taken, pauses, pause, order[-1]):
                    break
                taken.append(order.pop())
                pauses.append(pause)
                length += pause + float(taken[-1].duration or 0.0)
            windows.append(_window(taken, pauses, length))
    return windows


def _clip_part(clip: Example, plan: WindowPlan, rng: random.Random, find_cut: CutFinder) -> Optional[Window]:
    """A window of ``clip``'s first or last part, of a length drawn in ``plan.min_seconds``..`PART_MAX_SECONDS`
    (less in a clip too short to leave the cut's reach out) and cut at ``find_cut``'s point near it; None when the
    clip is too short for any."""
    seconds = float(clip.duration or 0.0)
    longest = min(PART_MAX_SECONDS, seconds - 2 * CUT_REACH_SECONDS)  # leaves out at least the cut's reach
    if longest < plan.min_seconds:
        return None
    length = rng.uniform(plan.min_seconds, longest)
    from_start = rng.random() < 0.5
    cut = find_cut(clip, length if from_start else seconds - length)
    begin, finish = (0.0, cut) if from_start else (cut, seconds)
    offset = clip.start or 0.0
    part = replace(clip, text=None, start=offset + begin, end=offset + finish, duration=finish - begin)
    return _window([part], [], finish - begin)


def _after_previous(windows: List[Window], share: float, rng: random.Random, offset: int) -> List[Window]:
    """``windows`` (one set, in order) with a ``share`` of them marked to follow the text of the nearest window
    before them that follows none (so that every previous text is known after one teacher pass): for the windows
    of a cut recording, the stretch just before; for joined clips, other speech, as a loop's earlier window may
    be. Windows over 30 s and windows with a prompt of their own are never marked."""
    marked: List[Window] = []
    last_free: Optional[int] = None
    for i, window in enumerate(windows):
        eligible = window.split is None and not window.prompt and last_free is not None
        if share > 0 and eligible and rng.random() < share:
            marked.append(replace(window, after=offset + last_free))
            continue
        marked.append(window)
        last_free = i
    return marked


def _branched(
    windows: List[Window], share: float, first_share: float, draws: Tuple[random.Random, random.Random]
) -> List[Window]:
    """``windows`` (every set) with a ``share`` of those that may branch given a `Window.branch`: windows without
    timestamp targets, at most 30 s, that no other window follows. A ``first_share`` of the branches are at the first
    word (0.0), the rest anywhere in the text. The draws are made for every window, eligible or not, so that one
    window's draw does not move with another's eligibility; ``draws``: the generators of the branches and of the
    first-word choice."""
    rng, first = draws
    followed = {w.after for w in windows if w.after is not None}
    marked = []
    for i, window in enumerate(windows):
        chosen, where = rng.random() < share, rng.random()
        where = 0.0 if first.random() < first_share else where
        eligible = not window.timestamps and window.split is None and i not in followed
        marked.append(replace(window, branch=where) if chosen and eligible else window)
    return marked


def _splittable(taken: Sequence[Example], pauses: Sequence[float], pause: float, clip: Example) -> bool:
    """Whether ``taken`` joined with ``clip`` after ``pause`` is at most 30 s or splits into two halves of 30 s."""
    durations = [float(c.duration or 0.0) for c in (*taken, clip)]
    if sum(durations) + sum(pauses) + pause <= MAX_CLIP_SECONDS:
        return True
    return split_point(durations, [*pauses, pause]) is not None


def joined_window(clips: Sequence[Example], pauses: Sequence[float]) -> Window:
    """``clips`` (durations filled) joined in order with ``pauses`` (one fewer) as one `Window` of any length."""
    return _window(clips, pauses, sum(float(c.duration or 0.0) for c in clips) + sum(pauses))


def _window(clips: Sequence[Example], pauses: Sequence[float], length: float) -> Window:
    pieces = tuple(Piece(c.audio, c.start, c.end, float(c.duration or 0.0)) for c in clips)
    texts = [c.text for c in clips]
    text = None if any(t is None for t in texts) else " ".join(t.strip() for t in texts)
    first = clips[0]
    return Window(
        audio=first.audio,
        text=text,
        row=first.row,
        language=first.language,
        prompt=first.prompt,
        duration=length,
        pieces=pieces,
        pauses=tuple(pauses),
        split=split_point([p.seconds for p in pieces], pauses) if length > MAX_CLIP_SECONDS else None,
    )


def _recording_spans(recordings: Sequence[Example], find_spans: Optional[SpanFinder]) -> Dict[int, list]:
    """Speech spans of each long recording (keyed by row), in seconds from the start of its clip."""
    find_spans = find_spans or speech_spans
    spans = {}
    for recording in recordings:
        audio = load_audio(recording.audio, start=recording.start, end=recording.end)
        spans[recording.row] = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in find_spans(audio)]
        logger.info("windows: %s has %d speech spans", recording.audio, len(spans[recording.row]))
    return spans


def _cut_recording(recording: Example, spans: Sequence[Tuple[float, float]], plan: WindowPlan, rng) -> List[Window]:
    """Consecutive windows of a long recording, each at most ``plan.max_seconds`` long and ending in the middle of a
    pause, where the next one starts (at most ``plan.pause[1]`` of the pause on either side); a span longer than a
    window is cut at the window's end."""
    offset = recording.start or 0.0
    windows: List[Window] = []
    i, previous_end = 0, None
    while i < len(spans):
        start = spans[i][0] if previous_end is None else max(previous_end, spans[i][0] - plan.pause[1])
        target = rng.uniform(plan.min_seconds, plan.max_seconds)
        end = min(spans[i][1], start + plan.max_seconds)
        i += 1
        while i < len(spans) and spans[i][1] - start <= target:
            end = spans[i][1]
            i += 1
        if i < len(spans):  # leave half of the pause to the next window
            end = min(end + min((spans[i][0] - end) / 2, plan.pause[1]), start + plan.max_seconds)
        previous_end = end
        piece = Piece(recording.audio, offset + start, offset + end, end - start)
        windows.append(
            Window(
                audio=recording.audio,
                text=None,
                row=recording.row,
                language=recording.language,
                duration=end - start,
                start=offset + start,
                end=offset + end,
                pieces=(piece,),
            )
        )
    return windows
