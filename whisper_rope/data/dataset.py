"""Training and evaluation data: log-mel features, target token sequences, batching and SpecAugment.

Features follow the model (`whisper_rope.features`): an encoder with an absolute table gets upstream's 30-s window
(the audio padded with silence to 480000 samples, then ``whisper.audio.log_mel_spectrogram``: 3000 frames); a
rotary-only encoder gets each clip's own frames, cut where unpadded transcription cuts them (`unpadded_features`),
zero-padded to the longest clip of the batch, with the real frame counts passed to the model so that padding is
masked. Rows whose token sequences are longer than the decoder's context are skipped like the manifest's bad rows.

Shapes: mel ``(b, n_mels, n_frames)`` with 100 frames per second; tokens/labels ``(b, n_tokens)``.
"""

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from whisper.tokenizer import Tokenizer, get_tokenizer

from ..audio import load_audio
from ..errors import AudioError, DataError, PathLike
from ..features import padded_window, unpadded_features
from .manifest import MAX_CLIP_SECONDS, Example, Manifest, RowProblems, check_audio, language_code, read_manifest
from .windows import Window, WindowPlan, compose_windows, window_audio, window_seconds

logger = logging.getLogger("whisper_rope")

#: Label value that excludes a position from the loss (``torch.nn.functional.cross_entropy``'s ignore_index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizerSpec:
    """What decides a model's tokenizer and SOT sequence."""

    multilingual: bool
    num_languages: int
    n_text_ctx: int
    task: str = "transcribe"
    default_language: Optional[str] = None

    @classmethod
    def for_model(cls, model, task: str = "transcribe", language: Optional[str] = None) -> "TokenizerSpec":
        return cls(model.is_multilingual, model.num_languages, model.dims.n_text_ctx, task, language_code(language))

    def language_of(self, example: Example) -> str:
        """The example's language code (``en`` for English-only models); ValueError when unusable."""
        code = language_code(example.language) or self.default_language
        if not self.multilingual:
            if code not in (None, "en"):
                raise ValueError(f"language {code!r} given, but the model is English-only")
            return "en"
        return code or "en"

    def tokenizer(self, language: str) -> Tokenizer:
        if self.multilingual:
            return get_tokenizer(True, num_languages=self.num_languages, language=language, task=self.task)
        return get_tokenizer(False)


def prompt_tokens(tokenizer: Tokenizer, prompt: Optional[str], n_text_ctx: int) -> List[int]:
    """``<|startofprev|>`` and the prompt's last tokens, as upstream decoding lays out a prompt (no loss on them)."""
    if not prompt:
        return []
    tokens = tokenizer.encode(" " + prompt.strip())
    return [tokenizer.sot_prev] + tokens[-(n_text_ctx // 2 - 1) :]


def target_sequence(
    tokenizer: Tokenizer, text_tokens: Sequence[int], prompt: Sequence[int] = (), timestamps: bool = False
) -> Tuple[List[int], List[int]]:
    """Decoder input and labels for one utterance.

    Sequence: ``prompt + SOT sequence (sot, language, task, no-timestamps) + text + EOT``; with ``timestamps`` the
    SOT sequence ends before no-timestamps and ``text_tokens`` hold upstream's timestamp tokens between the text,
    as decoding with timestamps produces them. The decoder reads every token but the last; position ``i`` is
    trained to predict token ``i + 1`` only where that token is text, a timestamp or EOT (other labels are
    `IGNORE_INDEX`). Returns (tokens, labels), both of length ``len(sequence) - 1``.
    """
    sot = tokenizer.sot_sequence if timestamps else tokenizer.sot_sequence_including_notimestamps
    head = list(prompt) + list(sot)
    sequence = head + list(text_tokens) + [tokenizer.eot]
    tokens = sequence[:-1]
    labels = [token if i + 1 >= len(head) else IGNORE_INDEX for i, token in enumerate(sequence[1:])]
    return tokens, labels


@dataclass
class Item:
    """One decoded example, as a worker returns it."""

    index: int
    mel: Tensor  # (n_mels, n_frames)
    frames: int  # real (unpadded) frames
    tokens: Optional[Tensor]  # (n_tokens,) or None without a transcript
    labels: Optional[Tensor]
    seconds: float
    teacher_mel: Optional[Tensor] = None  # (n_mels, 3000), only when it differs from ``mel``
    replaced_row: Optional[int] = None  # the row whose audio failed to decode and was replaced by this one
    teacher_states: Optional[Dict[str, Tensor]] = None  # cached teacher targets (training.teacher_cache)


class SpeechDataset(torch.utils.data.Dataset):
    """Examples with their target tokens; ``dataset[i]`` decodes the audio and computes the log-mel.

    pad_30s: give each clip as upstream's 30-s window (3000 frames) instead of its own frames.
    teacher_30s: also return the 30-s window (for a distillation teacher) when ``mel`` is unpadded.
    margin: audio positions of padding kept after each unpadded clip (an unpadded encoder's ``unpadded_margin``).
    """

    def __init__(
        self,
        manifest: Manifest,
        spec: TokenizerSpec,
        n_mels: int,
        pad_30s: bool,
        teacher_30s: bool = False,
        strict: bool = False,
        require_text: bool = True,
        margin: int = 0,
    ):
        self.source = manifest.source
        self.margin = margin
        self.spec = spec
        self.n_mels = n_mels
        self.pad_30s = pad_30s
        self.teacher_30s = teacher_30s
        self.strict = strict
        self.require_text = require_text
        rows = RowProblems(manifest.source, strict)
        rows.problems = list(manifest.problems)
        self.examples: List[Example] = []
        self.languages: List[str] = []
        self.prompts: List[List[int]] = []
        self.targets: List[Optional[Tuple[List[int], List[int]]]] = []
        for example in manifest.examples:
            try:
                language = spec.language_of(example)
            except ValueError as error:
                rows.skip(example.row, str(error))
                continue
            tokenizer = spec.tokenizer(language)
            prompt = prompt_tokens(tokenizer, example.prompt, spec.n_text_ctx)
            target = None
            if example.text is not None and require_text:
                target = target_sequence(tokenizer, tokenizer.encode(" " + example.text), prompt)
                if len(target[0]) > spec.n_text_ctx:
                    rows.skip(
                        example.row,
                        f"has {len(target[0])} decoder input tokens; the model's text context holds {spec.n_text_ctx}",
                    )
                    continue
            self.examples.append(example)
            self.languages.append(language)
            self.prompts.append(prompt)
            self.targets.append(target)
        rows.problems.sort(key=lambda p: p.row)
        self.problems = rows.problems

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def durations(self) -> List[float]:
        return [float(e.duration or 0.0) for e in self.examples]

    def tokenizer(self, index: int) -> Tokenizer:
        return self.spec.tokenizer(self.languages[index])

    def audio(self, example: Example) -> np.ndarray:
        """The waveform (n_samples,) of ``example``: a composed window's pieces joined, or its stretch of a file."""
        if isinstance(example, Window):
            return window_audio(example)
        return load_audio(example.audio, start=example.start, end=example.end)

    def timestamps(self, index: int) -> bool:
        """Whether example ``index``'s targets carry timestamp tokens (a `Window` that drew them; never one over 30 s,
        whose target is its halves' transcripts joined)."""
        return bool(getattr(self.examples[index], "timestamps", False))

    def branch(self, index: int) -> Optional[float]:
        """Where (0..1 of its text) the teacher's transcript of example ``index`` takes its second choice (a branched
        `Window`); None for the teacher's greedy transcript."""
        return getattr(self.examples[index], "branch", None)

    def decoded(self, index: int) -> Optional[np.ndarray]:
        """The waveform of example ``index``, or None (with one warning) when its audio cannot be decoded; in strict
        mode that raises `DataError` naming the row instead."""
        try:
            return self.audio(self.examples[index])
        except AudioError as error:
            if self.strict:
                raise DataError(f"{self.source}, row {self.examples[index].row}: {error}") from None
            logger.warning("%s, row %d: %s", self.source, self.examples[index].row, error)
            return None

    def __getitem__(self, index: int) -> Item:
        # Audio that passed the header check can still fail to decode (a truncated file); outside strict mode the
        # next example stands in, so batches keep their size (every DDP rank needs a non-empty batch).
        for attempt in range(len(self.examples)):
            candidate = (index + attempt) % len(self.examples)
            audio = self.decoded(candidate)
            if audio is None:
                continue
            item = self._item(candidate, audio)
            if attempt:
                item.replaced_row = self.examples[index].row
            return item
        raise DataError(f"{self.source}: no audio file of the manifest could be decoded")

    def _item(self, index: int, audio: np.ndarray) -> Item:
        long = getattr(self.examples[index], "split", None) is not None  # a window over 30 s (`Window.split`)
        if long and self.pad_30s:
            raise DataError(f"{self.source}: a window of over 30 s cannot be padded to a 30-s window")
        audio = audio if long else audio[:N_SAMPLES]
        if len(audio) < 2 * HOP_LENGTH:  # shorter than its header said: pad to the two frames every clip has
            audio = np.pad(audio, (0, 2 * HOP_LENGTH - len(audio)))
        window = None
        if (self.pad_30s or self.teacher_30s) and not long:
            # Upstream pads the *audio* with silence before the log-mel, so padding frames sit at the spectrogram's
            # floor, as in every 30-s window the pretrained model has seen.
            window = padded_window(audio, self.n_mels)
        if self.pad_30s:
            mel, frames = window, min(len(audio) // HOP_LENGTH, N_FRAMES)
        else:
            mel, frames = unpadded_features(audio, self.n_mels, self.margin, max_samples=None if long else N_SAMPLES)
        target = self.targets[index]
        return Item(
            index=index,
            mel=mel,
            frames=frames,
            tokens=torch.tensor(target[0]) if target else None,
            labels=torch.tensor(target[1]) if target else None,
            seconds=len(audio) / SAMPLE_RATE,
            teacher_mel=window if (self.teacher_30s and not self.pad_30s) else None,
        )


def load_examples(
    source: PathLike,
    model,
    *,
    pad_30s: bool,
    strict: bool = False,
    require_text: bool = True,
    teacher_30s: bool = False,
    language: Optional[str] = None,
    task: str = "transcribe",
    margin: int = 0,
    max_seconds: Optional[float] = MAX_CLIP_SECONDS,
) -> SpeechDataset:
    """Read, check and tokenise a manifest for ``model``; log what was skipped. ``max_seconds`` None keeps
    recordings longer than a window (for `windows.compose_windows` to cut).

    Raises `DataError` naming the file when nothing usable is left.
    """
    manifest = read_manifest(source, strict=strict, require_text=require_text)
    if not manifest.examples and not manifest.problems:
        raise DataError(f"manifest {manifest.source!r} is empty: it lists no audio")
    manifest = check_audio(manifest, strict=strict, max_seconds=max_seconds)
    spec = TokenizerSpec.for_model(model, task=task, language=language)
    dataset = SpeechDataset(manifest, spec, model.dims.n_mels, pad_30s, teacher_30s, strict, require_text, margin)
    if dataset.problems:
        logger.warning("%s", Manifest(manifest.source, dataset.examples, dataset.problems).summary())
    if not len(dataset):
        shown = "; ".join(str(p) for p in dataset.problems[:3])
        raise DataError(f"manifest {manifest.source!r} has no usable rows ({len(dataset.problems)} skipped: {shown})")
    return dataset


def composed_dataset(dataset: SpeechDataset, plan: WindowPlan, seed: int) -> SpeechDataset:
    """``dataset``'s clips composed into `windows.compose_windows`'s windows of every length (same options).
    Untranscribed windows draw timestamp targets (the teacher writes them); transcribed ones have none."""
    windows = compose_windows(dataset.examples, plan, seed, allow_timestamps=not dataset.require_text)
    composed = with_examples(dataset, windows)
    low, high = window_seconds(composed.examples)
    logger.info(
        "%s: %d clips composed into %d windows of %.1f-%.1f s (%d sets)",
        dataset.source,
        len(dataset),
        len(composed),
        low,
        high,
        plan.sets,
    )
    return composed


def with_examples(dataset: SpeechDataset, examples: Sequence[Example]) -> SpeechDataset:
    """A `SpeechDataset` of ``examples`` read with ``dataset``'s options (tokenizer, features, strictness), its
    skipped rows carried over."""
    manifest = Manifest(dataset.source, list(examples), list(dataset.problems))
    return SpeechDataset(
        manifest,
        dataset.spec,
        dataset.n_mels,
        dataset.pad_30s,
        dataset.teacher_30s,
        dataset.strict,
        dataset.require_text,
        dataset.margin,
    )


@dataclass
class Batch:
    """Collated items. ``mel`` is (b, n_mels, n_frames): 3000 frames when padded to 30 s, else the longest clip
    rounded up to an even count with zeros after each clip's ``frames``."""

    indices: List[int]
    mel: Tensor
    frames: Tensor  # (b,) real frames per clip
    padded_30s: bool
    tokens: Optional[Tensor]  # (b, n_tokens), EOT after each sequence
    labels: Optional[Tensor]  # (b, n_tokens), IGNORE_INDEX after each sequence
    seconds: List[float]
    teacher_mel: Optional[Tensor] = None
    replaced_rows: List[int] = field(default_factory=list)
    token_lengths: Optional[Tensor] = None  # (b,) decoder input tokens per row, before the EOT padding
    teacher_states: Optional[Dict[str, Tensor]] = None  # padded teacher targets (training.teacher_cache)
    teacher_positions: Optional[Tensor] = None  # (b,) audio positions the teacher's encoder states hold
    teacher_rows: Optional[Tensor] = None  # (b,) bool: rows with teacher states (not windows over 30 s)

    def __len__(self) -> int:
        return len(self.indices)

    def tokens_mask(self) -> Tensor:
        """(b, n_tokens) bool: True at each row's decoder input positions, False on the padding after them."""
        width = self.tokens.shape[1]
        return torch.arange(width, device=self.tokens.device)[None, :] < self.token_lengths[:, None]

    @property
    def n_frames(self) -> Optional[Tensor]:
        """What to pass as ``model(mel, tokens, n_frames)``: the real frame counts, or None for 30-s windows."""
        return None if self.padded_30s else self.frames

    def to(self, device: "torch.device | str") -> "Batch":
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device, non_blocking=True)

        states = None if self.teacher_states is None else {k: move(v) for k, v in self.teacher_states.items()}
        return replace(
            self,
            mel=move(self.mel),
            frames=move(self.frames),
            tokens=move(self.tokens),
            labels=move(self.labels),
            teacher_mel=move(self.teacher_mel),
            token_lengths=move(self.token_lengths),
            teacher_states=states,
            teacher_positions=move(self.teacher_positions),
            teacher_rows=move(self.teacher_rows),
        )


def pad_token_rows(rows: Sequence[Sequence[int]], fill: int) -> Tensor:
    """Right-pad integer rows to the longest: (b, n)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class Collator:
    """Stacks Items into a Batch (picklable, for DataLoader workers)."""

    def __init__(self, eot: int, padded_30s: bool):
        self.eot = eot
        self.padded_30s = padded_30s

    def __call__(self, items: Sequence[Item]) -> Batch:
        if self.padded_30s:
            mel = torch.stack([item.mel for item in items])
        else:
            width = max(item.mel.shape[-1] for item in items)
            width += width % 2  # the stride-2 conv then reads no frame past the batch
            mel = torch.zeros(len(items), items[0].mel.shape[0], width)
            for i, item in enumerate(items):
                mel[i, :, : item.mel.shape[-1]] = item.mel
        tokens = labels = lengths = None
        if items[0].tokens is not None:
            tokens = pad_token_rows([item.tokens.tolist() for item in items], self.eot)
            labels = pad_token_rows([item.labels.tolist() for item in items], IGNORE_INDEX)
            lengths = torch.tensor([len(item.tokens) for item in items], dtype=torch.long)
        teacher = None
        if items[0].teacher_mel is not None:
            teacher = torch.stack([item.teacher_mel for item in items])
        return Batch(
            indices=[item.index for item in items],
            mel=mel,
            frames=torch.tensor([item.frames for item in items], dtype=torch.long),
            padded_30s=self.padded_30s,
            tokens=tokens,
            labels=labels,
            seconds=[item.seconds for item in items],
            teacher_mel=teacher,
            replaced_rows=[item.replaced_row for item in items if item.replaced_row is not None],
            token_lengths=lengths,
        )


@dataclass(eq=False)
class BucketBatchSampler(torch.utils.data.Sampler):
    """An endless, seeded sequence of global batches, sliced per rank; its position can be saved and restored.

    Epoch ``e`` shuffles the examples with a generator seeded by ``(seed, e)``, drops the remainder that does not
    fill a batch, and (with ``bucket``) sorts windows of ``bucket_batches`` batches by duration before cutting them
    into batches, whose order is shuffled again: clips of a batch have similar lengths, so unpadded batches carry
    little padding. Batch ``p`` of the whole run is thus a pure function of (seed, p): resuming at position ``p``
    reproduces the remaining batches exactly, whatever the number of DataLoader workers or ranks.

    Each global batch holds ``batch_size`` examples; rank ``r`` of ``world_size`` gets items ``r::world_size``.
    ``durations`` (seconds per example) is kept as a float64 array; ``position`` is the next global batch.
    """

    durations: Sequence[float]
    batch_size: int
    seed: int = 0
    bucket: bool = True
    rank: int = 0
    world_size: int = 1
    bucket_batches: int = 32
    position: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of the number of processes ({self.world_size})"
            )
        if len(self.durations) < self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the {len(self.durations)} usable training examples"
            )
        self.durations = np.asarray(self.durations, dtype=np.float64)
        self._cache: Tuple[int, List[List[int]]] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        return len(self.durations) // self.batch_size

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The global batches of an epoch (lists of dataset indices)."""
        if self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.durations))[: self.batches_per_epoch * self.batch_size]
        if self.bucket:
            window = self.batch_size * self.bucket_batches
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([c[np.argsort(self.durations[c], kind="stable")] for c in chunks])
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def global_batch(self, position: int) -> List[int]:
        epoch, index = divmod(position, self.batches_per_epoch)
        return self.epoch_batches(epoch)[index]

    def __iter__(self) -> Iterator[List[int]]:
        position = self.position
        while True:
            yield self.global_batch(position)[self.rank :: self.world_size]
            position += 1

    def state_dict(self) -> Dict[str, int]:
        return {
            "position": int(self.position),
            "seed": int(self.seed),
            "batch_size": int(self.batch_size),
            "n_examples": int(len(self.durations)),
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("seed", "batch_size", "n_examples"):
            mine = self.state_dict()[key]
            if int(state[key]) != mine:
                raise ValueError(
                    f"cannot restore the sampler position: it was saved with {key}={state[key]}, this run has {mine} "
                    "(resume needs the same training data, batch_size and seed)"
                )
        self.position = int(state["position"])


def eval_batches(dataset: SpeechDataset, batch_size: int) -> List[List[int]]:
    """Every example once, sorted by duration (little padding), in batches of at most ``batch_size``."""
    order = np.argsort(np.asarray(dataset.durations), kind="stable").tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _worker_init(_: int) -> None:
    # Each worker computes one clip's log-mel at a time; several threads per worker would oversubscribe the CPU.
    torch.set_num_threads(1)


def make_loader(
    dataset: SpeechDataset,
    batch_sampler: "torch.utils.data.Sampler | List[List[int]]",
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Optional[Callable[[Sequence[Item]], Batch]] = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader that decodes and featurises in ``num_workers`` processes (0: in this process); batches are
    made by ``collate_fn`` (default: `Collator`)."""
    eot = dataset.tokenizer(0).eot if len(dataset) else 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or Collator(eot, dataset.pad_30s),
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=num_workers > 0,
    )


def spec_augment_(
    mel: Tensor,
    frames: Tensor,
    generator: torch.Generator,
    freq_masks: int = 2,
    freq_width: int = 27,
    time_masks: int = 2,
    time_width: int = 40,
    max_time_fraction: float = 0.1,
) -> Tensor:
    """SpecAugment masking in place: ``freq_masks`` bands of up to ``freq_width`` mel bins and ``time_masks`` spans
    of up to ``time_width`` frames (and at most ``max_time_fraction`` of the clip), set to zero.

    mel: (n_mels, n_frames); frames: real frames (masks stay inside the audio). Returns ``mel``.
    """
    n_mels = mel.shape[0]
    n_real = int(frames)

    def draw(high: int) -> int:
        return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator))

    for _ in range(freq_masks):
        width = draw(min(freq_width, n_mels))
        first = draw(n_mels - width)
        mel[first : first + width, :n_real] = 0
    limit = min(time_width, int(max_time_fraction * n_real))
    for _ in range(time_masks):
        width = draw(limit)
        first = draw(n_real - width)
        mel[:, first : first + width] = 0
    return mel
