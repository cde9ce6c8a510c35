"""Word and character error rates and speed of a model on a manifest of transcribed clips.

``evaluate(model, data)`` decodes every clip of a manifest (JSONL/CSV/TSV with ``audio`` and ``text``, read by
`whisper_rope.data`) in batches through the model's own ``decode``, normalises references and hypotheses with
upstream's text normaliser, and returns an `EvaluationResult`: corpus WER and CER with their substitutions,
deletions and insertions (``jiwer``), the real-time factor, and one row per utterance.

How clips are decoded:

* Greedy by default (``beam_size`` for beam search), without timestamps, one window per clip; missing or
  undecodable audio files are an error (or skipped with ``skip_invalid``).
* Recordings longer than 30 s are transcribed as ``whisper-rope transcribe`` does it, with the same decoding
  (temperature 0 only, ``beam_size``, ``fp16``, the model's unpadded setting, the language and the row's prompt as
  the initial prompt): through upstream's window-by-window loop (``long_form="loop"``, like ``--batch_size 1``) or
  cut at pauses into speech chunks decoded in batches of ``batch_size`` (``"batched"``, `transcription.longform`,
  like ``--batch_size N``). Both need timestamp tokens (the loop seeks on them, the chunks' segments are cut at
  them); the hypothesis is the transcript's text, capped as below without the one-window limit. An encoder that adds
  no absolute table can instead read a recording of up to 60 s whole (``"single"``,
  `transcription.single_window`: one encoder pass over all its frames, one decoding without timestamps, as the
  short clips); a model with a table is refused before any clip is read.
* Features as in training (`whisper_rope.data`): a 30-s window (the audio padded with silence, then the log-mel)
  for encoders with an absolute table; each clip's own frames, zero-padded to the batch's longest, for unpadded
  encoders (``unpadded``), which encode each clip as if alone and mask the padding. A batch holds one decoding
  language and one ``prompt`` (the manifest's previous-context text, given after ``<|startofprev|>``), its clips in
  order of duration, so unpadded batches hold little padding.
* Decoding length is capped per utterance at ``cap_factor * reference tokens + cap_offset`` (default 3x + 10, at
  most half the text context): a model that loops until upstream's 224-token limit would otherwise dominate the
  evaluation's time and its WER. The result says how many hypotheses reached their cap. In greedy decoding each
  clip's tokens do not depend on its batch mates, so a batch decodes to its largest cap and each hypothesis is cut
  to its own: the same tokens as decoding it alone with its own cap. Beam search keeps batch mates with equal caps
  together instead, because how many steps run changes which beams finish.

The result reports WER per clip length (`metrics.LENGTH_BUCKETS`: up to 5, 10, 20 and 30 s, and longer) beside
the corpus figures.

Batched and one-by-one decoding agree (greedy or beam search, padded or unpadded): a test pins it.

`evaluate_dataset` is the one evaluator: `evaluate` and ``compare`` call it on a manifest, and training's
validation (`validation_metrics`, which adds the teacher-forced loss) on its evaluation set, so the WER in
``train_log.jsonl`` is the WER ``whisper-rope evaluate`` reports for the same model, data and options (a test pins
that too).
"""

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm
from whisper.audio import SAMPLE_RATE
from whisper.decoding import DecodingOptions
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer
from whisper.transcribe import transcribe as upstream_transcribe

from ..adapted_lengths import warn_outside
from ..audio import load_audio
from ..data import (
    IGNORE_INDEX,
    MAX_CLIP_SECONDS,
    DataError,
    Example,
    Manifest,
    SpeechDataset,
    TokenizerSpec,
    check_audio,
    language_code,
    make_loader,
    read_manifest,
)
from ..errors import AudioError, PathLike
from ..fields import BATCH, BEAMS, MAX_COUNT, WORKERS, Bounds, check_bounds, opt
from ..fs.atomic import atomic_write_text
from ..model import WhisperRope
from ..transcription.longform import transcribe_recordings
from ..transcription.single_window import MAX_SINGLE_SECONDS, check_single_window, decode_single_window
from .metrics import (
    ErrorRates,
    LengthBucket,
    Normalizer,
    error_rates,
    length_bucket_table,
    length_buckets,
    normalizer_for,
)

NORMALIZERS = ("auto", "english", "basic", "none")
#: How recordings longer than 30 s are transcribed: upstream's window-by-window loop, batched speech chunks, or
#: one window for the whole recording (encoders without an absolute table; at most 60 s).
LONG_FORMS = ("loop", "batched", "single")
# Audio of long recordings held at once for the batched path (an hour, 230 MB as float32), as `transcribe` does.
_LONG_AUDIO_HELD = 3600 * SAMPLE_RATE
#: Hypotheses capped at this many times their reference's tokens (0: no cap); the cap is what keeps a hypothesis
#: that loops from costing the whole text context.
CAP_FACTOR = Bounds.reals(0, 1000)


@dataclass(frozen=True)
class EvaluationOptions:
    """How `evaluate` decodes and scores; each field is also a ``whisper-rope evaluate`` option."""

    language: Optional[str] = opt(
        None,
        "spoken language (code or name) of rows without a 'language' column; English-only models always use "
        "English; otherwise unknown languages are detected per clip",
    )
    normalizer: str = opt(
        "auto",
        "text normalisation before scoring: upstream's English normaliser, its basic one, or none; auto: English "
        "for English-only models and English rows, basic otherwise",
        choices=NORMALIZERS,
    )
    batch_size: int = opt(16, "clips decoded together", bounds=BATCH)
    beam_size: Optional[int] = opt(None, "beam search with this many beams (default: greedy)", bounds=BEAMS)
    fp16: Optional[bool] = opt(None, "decode in half precision (default: on CUDA devices; never on the CPU)")
    unpadded: Optional[bool] = opt(
        None,
        "feed each clip's own frames instead of a 30-s window (encoders without an absolute table only); "
        "default: the model's setting (a checkpoint fine-tuned unpadded says so)",
    )
    cap_factor: Optional[float] = opt(
        3.0,
        "cap each hypothesis at this many times the reference's tokens (plus --cap-offset); 0: no cap beyond "
        "upstream's half the text context",
        bounds=CAP_FACTOR,
    )
    cap_offset: int = opt(10, "tokens added to the per-utterance cap", bounds=Bounds.integers(0, 1000))
    limit: Optional[int] = opt(
        None, "evaluate only the first N rows of the manifest", bounds=Bounds.integers(1, MAX_COUNT)
    )
    skip_invalid: bool = opt(
        False,
        "skip unusable rows (missing or undecodable audio, bad spans) and list them in the result, "
        "instead of stopping at the first",
    )
    long_form: str = opt(
        "loop",
        "how recordings over 30 s are transcribed: loop (upstream's window-by-window loop, as transcribe "
        "--batch_size 1) or batched (speech chunks cut at pauses, decoded --batch-size at a time, as transcribe "
        "--batch_size N) or single (the whole recording, up to 60 s, in one window: encoders without an absolute "
        "table only); shorter clips are decoded as one window either way",
        choices=LONG_FORMS,
    )
    num_workers: int = opt(0, "processes decoding audio files (0: in the main process)", bounds=WORKERS)

    def validate(self) -> "EvaluationOptions":
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {self.normalizer!r}: expected one of {', '.join(NORMALIZERS)}")
        check_bounds(self)
        if self.long_form not in LONG_FORMS:
            raise ValueError(f"unknown long_form {self.long_form!r}: expected one of {', '.join(LONG_FORMS)}")
        language_code(self.language)
        return self


@dataclass
class UtteranceResult:
    """One clip: what was said, what was decoded, and the word edits between their normalised forms."""

    index: int  # position among the evaluated rows, in manifest order
    row: int  # line (JSONL) or record (CSV/TSV) number in the manifest
    audio: str
    seconds: float
    language: Optional[str]  # the language decoded in (detected, if none was given)
    reference: str
    hypothesis: str
    reference_normalized: str
    hypothesis_normalized: str
    substitutions: int
    deletions: int
    insertions: int
    n_words: int  # normalised reference words
    wer: float  # (substitutions + deletions + insertions) / max(n_words, 1)
    cer: float
    n_tokens: int  # hypothesis tokens
    cap: int  # the decoding-length cap of this utterance, in tokens
    capped: bool  # the hypothesis reached the cap (it may be a loop cut short)
    long_form: Optional[str] = None  # a recording over 30 s: "loop", "batched" or "single" (how it was transcribed)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


@dataclass
class EvaluationResult(ErrorRates):
    """Corpus-level scores of one model on one manifest, the settings that produced them, and per-utterance rows.

    The `ErrorRates` fields (wer, cer, edits, n_words, ...): edits over the normalised references of the whole corpus.
    audio_seconds: total duration of the clips. decode_seconds: wall time inside the model's ``decode`` calls
    (features and audio reading excluded; ``wall_seconds`` includes them). rtf: decode_seconds / audio_seconds.
    long_form: how recordings over 30 s were (or would be) transcribed. buckets: the scores per clip length
    (`metrics.length_buckets`). compute_type: what the model ran in (``float32`` or ``int8``).
    """

    model: str
    variant: str
    data: str
    audio_seconds: float
    decode_seconds: float
    wall_seconds: float
    rtf: float
    normalizer: str
    language: Optional[str]
    decoding: str  # "greedy" or "beam search (N beams)"
    batch_size: int
    fp16: bool
    unpadded: bool
    cap: str  # how hypotheses were capped, e.g. "3 x reference tokens + 10"
    n_capped: int
    device: str
    skipped: List[str] = field(default_factory=list)
    rows: List[UtteranceResult] = field(default_factory=list, repr=False)
    loss: Optional[float] = None  # teacher-forced loss per target token, when asked for (training's validation)
    long_form: str = "loop"
    buckets: List[LengthBucket] = field(default_factory=list)
    compute_type: str = "float32"  # the model's ("int8" under the commands' default on the CPU)

    def to_dict(self, rows: bool = True) -> Dict[str, Any]:
        """Plain data for JSON; ``rows=False`` leaves out the per-utterance rows."""
        data = asdict(self)
        if not rows:
            del data["rows"]
        return data

    def _precision(self) -> str:
        """``int8``, ``fp16`` or ``fp32``: the weights' compute type, or the activations' with float32 weights."""
        return "int8" if self.compute_type == "int8" else "fp16" if self.fp16 else "fp32"

    def summary(self, worst: int = 3) -> str:
        """A one-screen report: scores, edits, speed, settings and the ``worst`` utterances by word errors."""
        lines = [
            f"{self.model} ({self.variant}) on {self.data}: {self.n_utterances} utterances, "
            f"{self.audio_seconds:.1f} s of audio",
            f"  WER {100 * self.wer:6.2f} %  ({self.substitutions} substitutions, {self.deletions} deletions, "
            f"{self.insertions} insertions; {self.n_words} reference words)",
            f"  CER {100 * self.cer:6.2f} %  ({self.n_chars} reference characters)",
            f"  decoding: {self.decoding}, {self._precision()}, "
            f"{'unpadded' if self.unpadded else '30-s windows'}, batches of {self.batch_size}, on {self.device}; "
            f"capped at {self.cap}: {self.n_capped} of {self.n_utterances} reached it",
            f"  speed: {self.decode_seconds:.1f} s decoding ({self.wall_seconds:.1f} s in all) for "
            f"{self.audio_seconds:.1f} s of audio: real-time factor {self.rtf:.3f}",
            f"  normaliser: {self.normalizer}",
        ]
        n_long = sum(row.long_form is not None for row in self.rows)
        if n_long:
            how = _LONG_FORM_NAMES[self.long_form]
            recordings = "recording" if n_long == 1 else "recordings"
            lines.append(f"  {n_long} {recordings} over 30 s transcribed through {how}")
        if self.buckets:
            table = length_bucket_table({"": [asdict(bucket) for bucket in self.buckets]})
            lines += ["  per clip length:"] + ["    " + line for line in table.splitlines()]
        if self.skipped:
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            shown = "; ".join(self.skipped[:3]) + more
            lines.append(f"  skipped {len(self.skipped)} rows: {shown}")
        bad = sorted((r for r in self.rows if r.errors), key=lambda r: (-r.errors, r.index))[:worst]
        if bad:
            lines.append("  most word errors:")
            for r in bad:
                plural = "s" if r.errors > 1 else ""
                lines.append(f"    row {r.row} ({r.errors} error{plural}){' [capped]' if r.capped else ''}")
                lines.append(f"      ref: {_shorten(r.reference_normalized)}")
                lines.append(f"      hyp: {_shorten(r.hypothesis_normalized)}")
        return "\n".join(lines)

    def write(self, path: PathLike) -> Tuple[Path, Path]:
        """Write the summary (without rows) as JSON to ``path`` and the rows as JSON lines next to it
        (``path`` with the suffix ``.jsonl``), each atomically. Returns both paths."""
        summary_path, rows_path = output_paths(path)
        atomic_write_text(summary_path, json.dumps(self.to_dict(rows=False), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(rows_path, "".join(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in self.rows))
        return summary_path, rows_path


_LONG_FORM_NAMES = {
    "loop": "upstream's window-by-window loop",
    "batched": "batched speech chunks",
    "single": "a single window each",
}


def output_paths(path: PathLike) -> Tuple[Path, Path]:
    """(summary, per-utterance rows) that `EvaluationResult.write` writes for ``path``: ``path`` and ``path`` with
    the suffix ``.jsonl``."""
    summary_path = Path(path)
    rows_path = summary_path.with_suffix(".jsonl")
    if rows_path == summary_path:
        raise ValueError(f"output {os.fspath(path)!r} ends in .jsonl, the suffix of the per-utterance file: use .json")
    return summary_path, rows_path


def _shorten(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _normalizer(choice: str, language: Optional[str]) -> Tuple[str, Normalizer]:
    """(name, function) of the normaliser for a row decoded in ``language`` (None: unknown beforehand)."""
    if choice == "none":
        return "none", lambda text: text
    if choice == "auto":
        choice = "english" if language == "en" else "basic"
    return choice, normalizer_for("en" if choice == "english" else None)


def _manifest(data: "PathLike | Manifest | Sequence[Tuple[PathLike, str]]", strict: bool) -> Manifest:
    if isinstance(data, Manifest):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_manifest(data, strict=strict, require_text=False)
    examples = []
    for number, pair in enumerate(data, start=1):
        audio, text = pair
        examples.append(Example(audio=os.path.abspath(os.fspath(audio)), text=text, row=number))
    return Manifest("<list>", examples)


def _batches(order: Sequence[int], caps: Sequence[int], batch_size: int, equal_caps: bool) -> List[List[int]]:
    """Consecutive runs of ``order`` of at most ``batch_size``; with ``equal_caps`` a batch never mixes caps."""
    if equal_caps:
        order = sorted(order, key=lambda i: caps[i])  # stable: the duration order holds within a cap
    batches: List[List[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and (not equal_caps or caps[batches[-1][0]] == caps[index]):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _input_mode(model: Whisper, unpadded: bool) -> ContextManager:
    """``model`` decoding ``unpadded`` (or 30-s windows) inside the ``with`` block, as it was afterwards."""
    if isinstance(model, WhisperRope):
        return model.using(unpadded=unpadded)
    if unpadded:
        raise ValueError("unpadded decoding needs a whisper_rope model (upstream's encoder takes only 30-s windows)")
    return nullcontext()


def evaluate(
    model: Whisper,
    data: "PathLike | Manifest | Sequence[Tuple[PathLike, str]]",
    options: Optional[EvaluationOptions] = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> EvaluationResult:
    """Decode every clip of ``data`` with ``model`` and score the hypotheses against the references.

    Args:
        model: a `WhisperRope` (or upstream ``Whisper``: greedy, 30-s windows), on the device to decode on.
        data: a manifest path (JSONL/CSV/TSV with ``audio`` and ``text``; relative paths are resolved against the
            manifest's folder), a parsed `whisper_rope.data.Manifest`, or ``(audio path, text)`` pairs.
        options: `EvaluationOptions`; keyword ``overrides`` replace single fields (``evaluate(m, d, batch_size=8)``).
        progress: show a progress bar (clips) on stderr.

    Returns an `EvaluationResult`; its ``rows`` are in manifest order. Raises `whisper_rope.data.DataError` (a
    ValueError) for an unusable manifest or, without ``skip_invalid``, its first unusable row.
    """
    options = replace(options or EvaluationOptions(), **overrides).validate()
    if options.long_form == "single":
        check_single_window(model, "--long-form single")
    started = time.perf_counter()
    device = next(model.parameters()).device
    fp16 = (device.type == "cuda") if options.fp16 is None else options.fp16
    if fp16 and device.type == "cpu":
        warnings.warn("fp16 is not supported on the CPU; decoding in fp32")
        fp16 = False
    unpadded = bool(getattr(model, "unpadded", False)) if options.unpadded is None else options.unpadded
    with _input_mode(model, unpadded):
        dataset = _dataset(model, data, options, unpadded)
        return evaluate_dataset(
            model, dataset, replace(options, fp16=fp16, unpadded=unpadded), progress=progress, started=started
        )


def _dataset(model: Whisper, data: Any, options: EvaluationOptions, unpadded: bool) -> SpeechDataset:
    """The clips of ``data`` with their features as the model takes them (a 30-s window, or unpadded)."""
    strict = not options.skip_invalid
    manifest = _manifest(data, strict)
    for example in manifest.examples:
        if example.text is None:
            raise DataError(f"{manifest.source}, row {example.row}: has no 'text' column to score against")
    if options.limit is not None:
        manifest = replace(manifest, examples=manifest.examples[: options.limit])
    if not manifest.examples and not manifest.problems:
        raise DataError(f"manifest {manifest.source!r} is empty: it lists no audio")
    manifest = check_audio(manifest, strict=strict, max_seconds=None)
    spec = TokenizerSpec.for_model(model, language=options.language)
    margin = getattr(model, "unpadded_margin", 0) if unpadded else 0
    dataset = SpeechDataset(
        manifest, spec, model.dims.n_mels, pad_30s=not unpadded, strict=strict, require_text=False, margin=margin
    )
    if not len(dataset):
        shown = "; ".join(str(problem) for problem in dataset.problems[:3])
        raise DataError(f"manifest {manifest.source!r} has no usable rows ({shown})")
    return dataset


@torch.no_grad()
def evaluate_dataset(
    model: Whisper,
    dataset: SpeechDataset,
    options: EvaluationOptions,
    *,
    progress: bool = False,
    with_loss: bool = False,
    started: Optional[float] = None,
) -> EvaluationResult:
    """The one evaluator: decode every clip of ``dataset`` and score it (`evaluate` and training's validation).

    Clips are decoded greedily (or with ``options.beam_size``) without timestamps, in batches of one decoding
    language and prompt, in order of duration; each hypothesis is capped at ``cap_factor`` x its reference's tokens
    + ``cap_offset`` (see the module docstring); references and hypotheses go through the normaliser of their
    language. ``options.fp16`` and ``options.unpadded`` must be decided (not None): the dataset's features already
    follow ``unpadded``. with_loss: also the teacher-forced loss (mean cross-entropy per target token), for datasets
    built with targets (training's). started: when the work began (``perf_counter``), for ``wall_seconds``.
    """
    started = time.perf_counter() if started is None else started
    device = next(model.parameters()).device
    languages = _decoding_languages(model, dataset, options)
    caps = _caps(model, dataset, languages, options)
    run = _Decoded(skipped=[str(problem) for problem in dataset.problems])
    long = set(_long_recordings(dataset))
    if options.unpadded and len(dataset):
        warn_outside(model, max(dataset.durations), f"{dataset.source}")
    batches = _decoding_batches(dataset, languages, caps, options, exclude=long)
    loader = make_loader(dataset, batches, num_workers=options.num_workers)
    bar = tqdm(total=len(dataset), desc="evaluating", unit="clip", disable=not progress, file=sys.stderr)
    try:
        for wanted, batch in zip(batches, loader):
            batch = batch.to(device)
            _decode_batch(model, dataset, wanted, batch, languages[wanted[0]], caps, options, run)
            if with_loss:
                run.add_loss(model, batch)
            bar.update(len(wanted))
        if long:
            _decode_long(model, dataset, sorted(long), languages, caps, options, run, bar)
    finally:
        bar.close()
    result = _score(model, dataset, options, run, caps, languages, time.perf_counter() - started, str(device))
    result.loss = run.loss if with_loss else None
    return result


@dataclass
class _Decoded:
    """What decoding the batches produced: per clip index (language, tokens, text), and the running totals;
    ``long``: the indices of the recordings over 30 s transcribed by the long-form path."""

    skipped: List[str]
    results: Dict[int, Tuple[Optional[str], List[int], str]] = field(default_factory=dict)
    long: set = field(default_factory=set)
    decode_seconds: float = 0.0
    loss_sum: float = 0.0
    n_target_tokens: int = 0

    def add_loss(self, model: Whisper, batch: Any) -> None:
        """Teacher-forced cross-entropy of the batch's targets, summed over target tokens."""
        logits = model(batch.mel, batch.tokens, batch.n_frames)
        flat_labels = batch.labels.flatten()
        self.loss_sum += float(
            F.cross_entropy(logits.flatten(0, 1), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        )
        self.n_target_tokens += int((flat_labels != IGNORE_INDEX).sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_target_tokens, 1)


def _decoding_languages(model: Whisper, dataset: SpeechDataset, options: EvaluationOptions) -> List[Optional[str]]:
    """Per clip, the language to decode in: its own, else ``options.language``; None (multilingual models only):
    detected per clip."""
    if not model.is_multilingual:
        return ["en"] * len(dataset)
    default = language_code(options.language)
    return [language_code(example.language) or default for example in dataset.examples]


def _tokenizer(model: Whisper, language: Optional[str]) -> Tokenizer:
    """Upstream's (cached) tokenizer of the model for ``language``."""
    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language=language, task="transcribe")


def _caps(model: Whisper, dataset: SpeechDataset, languages: Sequence[Optional[str]], options) -> List[int]:
    """Per clip, the most tokens its hypothesis may have: cap_factor x its reference's tokens + cap_offset, at most
    half the text context (upstream's own limit), which is also the cap without a cap_factor. A recording over 30 s
    has that limit in each of its 30-s windows: its cap is the per-reference one alone, or the windows' limits
    summed without a cap_factor."""
    max_len = model.dims.n_text_ctx // 2
    caps = []
    for example, language, seconds in zip(dataset.examples, languages, dataset.durations):
        limit = max_len * math.ceil(seconds / MAX_CLIP_SECONDS)
        reference = example.text.strip()
        if not options.cap_factor:
            caps.append(limit)
            continue
        n_ref = len(_tokenizer(model, language or "en").encode(" " + reference)) if reference else 0
        cap = math.ceil(options.cap_factor * n_ref) + options.cap_offset
        caps.append(cap if seconds > MAX_CLIP_SECONDS else min(max_len, cap))
    return caps


def _long_recordings(dataset: SpeechDataset) -> List[int]:
    """Indices of the clips longer than one 30-s window."""
    return [index for index, seconds in enumerate(dataset.durations) if seconds > MAX_CLIP_SECONDS]


def _decoding_batches(
    dataset: SpeechDataset,
    languages: Sequence[Optional[str]],
    caps: Sequence[int],
    options: EvaluationOptions,
    exclude: "set[int]" = frozenset(),
) -> List[List[int]]:
    """Batches of clip indices (but ``exclude``): one decoding language and prompt per batch, clips in order of
    duration (least padding for unpadded encoders); with beam search, one cap per batch too."""
    groups: Dict[Tuple[Optional[str], Optional[str]], List[int]] = {}
    for index in sorted(range(len(dataset)), key=lambda i: (dataset.durations[i], i)):
        if index not in exclude:
            groups.setdefault((languages[index], dataset.examples[index].prompt), []).append(index)
    beam = options.beam_size is not None and options.beam_size > 1
    return [batch for group in groups.values() for batch in _batches(group, caps, options.batch_size, beam)]


def _decode_batch(model, dataset, wanted, batch, language, caps, options, run: _Decoded) -> None:
    """Decode one batch to its largest cap and cut each hypothesis to its own (see the module docstring)."""
    sample_len = max(caps[i] for i in wanted)
    decoding = DecodingOptions(
        language=language,
        without_timestamps=True,
        fp16=options.fp16,
        sample_len=sample_len,
        beam_size=options.beam_size,
        prompt=dataset.examples[wanted[0]].prompt,
    )
    tick = time.perf_counter()
    decoded = _decode(model, batch.mel, decoding)
    run.decode_seconds += time.perf_counter() - tick
    for index, got, result in zip(wanted, batch.indices, decoded):
        if got != index:
            # Outside strict mode the dataset stands another clip in for one whose audio failed to decode.
            example = dataset.examples[index]
            run.skipped.append(f"row {example.row}: audio {example.audio!r} could not be decoded")
            continue
        tokens = list(result.tokens)[: caps[index]]
        cut = len(tokens) < len(result.tokens)
        text = _tokenizer(model, result.language).decode(tokens).strip() if cut else result.text
        run.results[index] = (result.language, tokens, text)


def _decode_long(model, dataset, indices, languages, caps, options: EvaluationOptions, run: _Decoded, bar) -> None:
    """Transcribe the recordings ``indices`` (over 30 s) through ``options.long_form``; each hypothesis is its
    transcript's text, cut to its cap. Recordings of one language and prompt share the batched path's batches."""
    if options.long_form == "single":
        _decode_single(model, dataset, indices, languages, caps, options, run, bar)
        return
    groups: Dict[Tuple[Optional[str], Optional[str]], List[int]] = {}
    for index in indices:
        groups.setdefault((languages[index], dataset.examples[index].prompt), []).append(index)
    for (language, prompt), group in groups.items():
        keywords = long_form_options(options, language, prompt)
        for part in _held_parts(dataset, group):
            audios = {index: _long_audio(dataset, index, run) for index in part}
            audios = {index: audio for index, audio in audios.items() if audio is not None}
            tick = time.perf_counter()
            transcripts = _transcribe_long(model, list(audios.values()), options, keywords)
            run.decode_seconds += time.perf_counter() - tick
            for index, transcript in zip(audios, transcripts):
                run.results[index] = _long_hypothesis(model, transcript, caps[index])
                run.long.add(index)
            bar.update(len(part))


def _decode_single(model, dataset, indices, languages, caps, options: EvaluationOptions, run: _Decoded, bar) -> None:
    """Decode each recording of ``indices`` (30-60 s) whole in one window, greedy (or ``options.beam_size``) without
    timestamps to its cap, as a short clip is decoded (`transcription.single_window`)."""
    for index in indices:
        example = dataset.examples[index]
        if dataset.durations[index] > MAX_SINGLE_SECONDS:
            raise DataError(
                f"{dataset.source}, row {example.row}: {dataset.durations[index]:.1f} s is longer than --long-form "
                f"single reads in one window ({MAX_SINGLE_SECONDS:g} s); use loop or batched"
            )
        audio = _long_audio(dataset, index, run)
        if audio is not None:
            decoding = DecodingOptions(
                language=languages[index],
                without_timestamps=True,
                fp16=options.fp16,
                sample_len=caps[index],
                beam_size=options.beam_size,
                prompt=example.prompt,
            )
            tick = time.perf_counter()
            result = decode_single_window(model, audio, decoding)
            run.decode_seconds += time.perf_counter() - tick
            run.results[index] = (result.language, list(result.tokens), result.text)
            run.long.add(index)
        bar.update(1)


def long_form_options(options: EvaluationOptions, language: Optional[str], prompt: Optional[str]) -> Dict[str, Any]:
    """The keywords of upstream ``transcribe`` (and of `longform.transcribe_recordings`) that decode as `evaluate`
    does: temperature 0 only (no fallback), ``options.beam_size`` (greedy without), ``options.fp16``, ``language``
    (None: detected) and the row's prompt as the initial prompt; quiet."""
    return {
        "language": language,
        "temperature": 0.0,
        "beam_size": options.beam_size,
        "fp16": bool(options.fp16),
        "initial_prompt": prompt,
        "verbose": None,
    }


def _held_parts(dataset: SpeechDataset, indices: Sequence[int]) -> List[List[int]]:
    """``indices`` in consecutive parts of at most `_LONG_AUDIO_HELD` samples (every part holds at least one)."""
    parts: List[List[int]] = []
    held = 0
    for index in indices:
        samples = dataset.durations[index] * SAMPLE_RATE
        if not parts or held + samples > _LONG_AUDIO_HELD:
            parts.append([])
            held = 0
        parts[-1].append(index)
        held += samples
    return parts


def _long_audio(dataset: SpeechDataset, index: int, run: _Decoded):
    """The recording's waveform, or None (listed in ``run.skipped``) when it cannot be decoded outside strict mode."""
    example = dataset.examples[index]
    try:
        return load_audio(example.audio, start=example.start, end=example.end)
    except AudioError as error:
        if dataset.strict:
            raise DataError(f"{dataset.source}, row {example.row}: {error}") from None
        run.skipped.append(f"row {example.row}: {error}")
        return None


def _transcribe_long(model: Whisper, audios: List[Any], options: EvaluationOptions, keywords: Dict[str, Any]):
    """One upstream result dict per recording, through upstream's loop or the batched long-form path."""
    if not audios:
        return []
    if options.long_form == "loop":
        return [upstream_transcribe(model, audio, **keywords) for audio in audios]
    if not isinstance(model, WhisperRope):
        raise ValueError("long_form 'batched' needs a whisper_rope model (upstream's decode beam-searches one clip)")
    return transcribe_recordings(model, audios, options.batch_size, **keywords)


def _long_hypothesis(model: Whisper, transcript: Dict[str, Any], cap: int) -> Tuple[Optional[str], List[int], str]:
    """(language, text tokens, text) of a long-form transcript, cut to ``cap`` text tokens."""
    tokenizer = _tokenizer(model, transcript["language"])
    tokens = [token for segment in transcript["segments"] for token in segment["tokens"] if token < tokenizer.eot]
    if len(tokens) <= cap:
        return transcript["language"], tokens, transcript["text"].strip()
    return transcript["language"], tokens[:cap], tokenizer.decode(tokens[:cap]).strip()


def _decode(model: Whisper, mel: torch.Tensor, options: DecodingOptions) -> list:
    """One DecodingResult per clip of ``mel`` (b, n_mels, n_frames)."""
    if mel.shape[0] > 1 and options.beam_size and options.beam_size > 1 and not isinstance(model, WhisperRope):
        # Upstream's decode cannot beam-search several clips at once (it repeats tokens, not audio features).
        return [model.decode(clip, options) for clip in mel]
    decoded = model.decode(mel, options)
    return decoded if isinstance(decoded, list) else [decoded]


def score_texts(
    references: Sequence[str], hypotheses: Sequence[str], normalizer: "str | Normalizer" = "english"
) -> Tuple[ErrorRates, List[Tuple[str, str, ErrorRates]]]:
    """Normalise references and hypotheses and count word and character edits, for the corpus and per utterance.

    normalizer: ``english`` (or ``auto``) / ``basic`` (upstream's normalisers), ``none`` (compare as given, split on
    whitespace), or a function. Returns the corpus `ErrorRates` and, per utterance, (normalised reference, normalised
    hypothesis, its `ErrorRates`). An empty reference counts every hypothesis word as an insertion.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"score_texts needs one hypothesis per reference: got {len(references)} and {len(hypotheses)}")
    if isinstance(normalizer, str) and normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}: expected one of {', '.join(NORMALIZERS)}")
    normalize = _normalizer(normalizer, "en")[1] if isinstance(normalizer, str) else normalizer
    pairs = [(" ".join(normalize(r).split()), " ".join(normalize(h).split())) for r, h in zip(references, hypotheses)]
    per_utterance = [(r, h, error_rates([r], [h])) for r, h in pairs]
    corpus = error_rates([r for r, _ in pairs], [h for _, h in pairs])
    return corpus, per_utterance


def _utterance_rows(model, dataset, options, run: _Decoded, caps, languages) -> Tuple[List[UtteranceResult], set]:
    """One row per decoded clip, in manifest order, and the names of the normalisers used."""
    rows: List[UtteranceResult] = []
    normalizer_names = set()
    for index, example in enumerate(dataset.examples):
        if index not in run.results:
            continue  # its audio could not be decoded (listed in ``skipped``)
        language, tokens, hypothesis = run.results[index]
        name, normalize = _normalizer(options.normalizer, languages[index] if model.is_multilingual else "en")
        normalizer_names.add(name)
        _, [(reference_normalized, hypothesis_normalized, rates)] = score_texts([example.text], [hypothesis], normalize)
        rows.append(
            UtteranceResult(
                index=index,
                row=example.row,
                audio=example.audio,
                seconds=round(dataset.durations[index], 4),
                language=language,
                reference=example.text,
                hypothesis=hypothesis,
                reference_normalized=reference_normalized,
                hypothesis_normalized=hypothesis_normalized,
                **{k: getattr(rates, k) for k in ("substitutions", "deletions", "insertions", "n_words", "wer", "cer")},
                n_tokens=len(tokens),
                cap=caps[index],
                capped=len(tokens) >= caps[index],
                long_form=options.long_form if index in run.long else None,
            )
        )
    return rows, normalizer_names


def _score(model, dataset, options, run: _Decoded, caps, languages, wall_seconds, device) -> EvaluationResult:
    rows, normalizer_names = _utterance_rows(model, dataset, options, run, caps, languages)
    corpus = error_rates([r.reference_normalized for r in rows], [r.hypothesis_normalized for r in rows])
    audio_seconds = float(sum(dataset.durations[index] for index in run.results))
    report = getattr(model, "load_report", None)
    given_languages = sorted({str(language) for language in languages})
    beam = options.beam_size is not None and options.beam_size > 1
    cap = (
        f"{options.cap_factor:g} x reference tokens + {options.cap_offset}"
        if options.cap_factor
        else f"{model.dims.n_text_ctx // 2} tokens (upstream's limit)"
    )
    return EvaluationResult(
        model=report.source if report is not None else type(model).__name__,
        variant=getattr(model, "variant", "whisper"),
        data=dataset.source,
        **asdict(corpus),
        audio_seconds=round(audio_seconds, 4),
        decode_seconds=round(run.decode_seconds, 4),
        wall_seconds=round(wall_seconds, 4),
        rtf=round(run.decode_seconds / audio_seconds, 5) if audio_seconds else 0.0,
        normalizer="+".join(sorted(normalizer_names)),
        language=given_languages[0] if len(given_languages) == 1 and given_languages[0] != "None" else None,
        decoding=f"beam search ({options.beam_size} beams)" if beam else "greedy",
        batch_size=options.batch_size,
        fp16=bool(options.fp16),
        unpadded=bool(options.unpadded),
        cap=cap,
        n_capped=sum(row.capped for row in rows),
        device=device,
        skipped=run.skipped,
        rows=rows,
        long_form=options.long_form,
        buckets=length_buckets(rows),
        compute_type=getattr(model, "compute_type", "float32"),
    )


def validation_metrics(model: Whisper, dataset: SpeechDataset, batch_size: int, device: torch.device) -> Dict[str, Any]:
    """Training's validation record: `evaluate_dataset` of a training set (greedy, fp32, batches of ``batch_size``,
    the features the model trains on) and its teacher-forced loss. ``device`` is where the model is."""
    was_training = model.training
    model.eval()
    unpadded = not dataset.pad_30s
    options = EvaluationOptions(batch_size=batch_size, fp16=False, unpadded=unpadded)
    try:
        with _input_mode(model, unpadded):
            result = evaluate_dataset(model, dataset, options, with_loss=True)
    finally:
        model.train(was_training)
    return {
        "loss": result.loss,
        **{k: getattr(result, k) for k in ("wer", "cer", "substitutions", "deletions", "insertions", "n_words")},
        "n_clips": result.n_utterances,
        "capped": result.n_capped,
        "seconds": result.wall_seconds,
        "examples": [{"reference": r.reference, "hypothesis": r.hypothesis} for r in result.rows[:3]],
    }


# ---- command line ------------------------------------------------------------------------------------------------
