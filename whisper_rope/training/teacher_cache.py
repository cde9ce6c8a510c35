"""What a frozen teacher says about each clip, computed once and kept on disk.

A distillation teacher is frozen and, without augmentation of its input, its targets are a pure function of the
clip: the teacher's transcript (for label-free training), its hidden states on the teacher-forced tokens and its
encoder states on the clip's positions. Recomputing them every epoch costs a 30-s window through the teacher's
encoder per clip — on a 2-core CPU more than the student's own step. `TeacherCache.fill` computes every missing
entry once (batched, with a progress bar, or log lines where there is none); training then reads entries in its
DataLoader workers.

An entry is one safetensors file (fp16 states, int64 tokens) named by a SHA-256 over

* the teacher: its variant, dims, table scales and every tensor of its state dict (`teacher_fingerprint`);
* the options: the unpadded margin (0 for runs that keep only decoder states, which do not depend on it),
  where the transcript comes from, the format version;
* the clip: its 30-s log-mel window (a function of its audio, and of its position count) and the text it is forced
  with.

A training window over 30 s (one with a `Window.split`) is read by the teacher half by half, as two ordinary 30-s
windows (`window_halves`): its entry holds only the two transcripts joined, without timestamps (the teacher has no
states of the whole window to give), and is named by both halves' log-mel windows and the forced text.

Any change of these gives another name, so a stale entry is never read; writes are atomic. The entry records its
name and forced text (safetensors metadata), and what a run reads is checked before use (`entry_problem`): that
record, the tensors' dtypes and shapes against the teacher's dimensions and the clip's position and token counts,
token ids in the vocabulary, finite values. An entry that fails (truncated, damaged, foreign, edited) is recomputed
with one warning naming it. A cache directory that is a symlink, or cannot be written (read-only, full), is not
written to: the targets of the run go to a temporary directory removed at exit, with one warning.
"""

import errno
import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import AbstractSet, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor
from whisper.decoding import DecodingOptions

from ..data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    Item,
    SpeechDataset,
    make_loader,
    pad_token_rows,
    target_sequence,
    window_halves,
)
from ..errors import one_line
from ..features import padded_window, real_frame_counts
from ..fs.atomic import atomic_write, atomic_write_text
from ..model import WhisperRope
from ..progress import PhaseProgress
from .losses import StateRecorder, recorded_modules, stacked_states

logger = logging.getLogger("whisper_rope")

FORMAT_VERSION = 2  # 2: entries record their name and forced text
#: The safetensors metadata field holding what an entry was written for (JSON: entry name, forced text, version).
RECORD = "whisper_rope_teacher_entry"
TRANSCRIPTS = ("reference", "teacher")
#: The tensors an entry holds for each state kind.
STORED_KEYS = {
    "decoder_layers": ("decoder_layers",),
    "encoder_output": ("encoder_output",),
    "encoder_layers": ("encoder_layers",),
    "attention": ("encoder_attention", "decoder_attention"),
}
#: Kinds whose stored tensors have no encoder-position axis, so they do not depend on the unpadded margin.
MARGIN_FREE_KINDS = frozenset({"decoder_layers"})


@dataclass(frozen=True)
class TargetSpec:
    """Which targets an entry holds and how they were made.

    kinds: state kinds of `losses.STATE_KINDS` to store (``decoder_layers`` also gives the teacher's logits,
        since its last entry is the final layer norm's output).
    margin: padding positions the student keeps after a clip's real frames (compared like real positions).
    transcripts: ``reference`` forces the manifest's text; ``teacher`` forces the teacher's own greedy transcript
        (label-free training; the transcript is stored in the entry).
    """

    kinds: Tuple[str, ...] = ("decoder_layers",)
    margin: int = 0
    transcripts: str = "reference"

    def __post_init__(self) -> None:
        if self.transcripts not in TRANSCRIPTS:
            raise ValueError(f"teacher transcripts must be one of {', '.join(TRANSCRIPTS)}, got {self.transcripts!r}")
        if self.margin < 0:
            raise ValueError(f"unpadded margin must not be negative, got {self.margin}")


def teacher_fingerprint(teacher: WhisperRope) -> str:
    """SHA-256 over what determines the teacher's function: variant, dims, table scales and every tensor."""
    digest = hashlib.sha256()
    header = {
        "variant": teacher.variant,
        "dims": teacher.dims_dict(),
        "rotary": teacher.rotary_options,
        "table_scale": list(teacher.settings.table_scales),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class TeacherCache:
    """Teacher targets per clip under ``root/<teacher and options>/``.

    root: the cache directory (e.g. ``~/.cache/whisper_rope/teacher-targets``); created on first write.
    """

    def __init__(self, root: Path, teacher: WhisperRope, spec: TargetSpec):
        if set(spec.kinds) <= MARGIN_FREE_KINDS:
            # The teacher reads the 30-s window whatever the student's margin: runs that differ only in their
            # margin share decoder-only entries. Held at 0 so that an entry completed with encoder kinds (another
            # run's) keeps the positions this directory's scope says.
            spec = replace(spec, margin=0)
        self.teacher = teacher
        self.spec = spec
        self.root = Path(root).expanduser()
        fingerprint = teacher_fingerprint(teacher)
        # The kinds are not part of the name: an entry that lacks a kind a run needs is recomputed with the union.
        options = json.dumps({"margin": spec.margin, "transcripts": spec.transcripts, "version": FORMAT_VERSION})
        self.scope = hashlib.sha256(f"{fingerprint}:{options}".encode()).hexdigest()
        self.directory = self.root / f"{fingerprint[:16]}-{self.scope[:12]}"
        self.computed = 0  # entries the last `fill` had to compute
        self._about = {
            "teacher_fingerprint": fingerprint,
            "variant": teacher.variant,
            **asdict(spec),
            "version": FORMAT_VERSION,
        }
        self._fallback: Optional[Path] = None  # the temporary directory entries go to when the cache is unusable
        self._fallback_owner: Optional[tempfile.TemporaryDirectory] = None
        self._skip_directory = False  # the cache directory is a link: neither read nor written
        self._forced: Dict[Path, str] = {}  # entry name -> its forced text, recorded in the entry when written
        self._warned: set = set()  # entries already reported as failing (one warning each)

    def entry_path(self, window: Tensor, forced: str) -> Path:
        """The file of one clip: ``window`` its (n_mels, 3000) log-mel, ``forced`` what determines the forced tokens
        (the reference tokens and prompt, or the language, task and prompt the teacher transcribes with)."""
        digest = hashlib.sha256(self.scope.encode())
        digest.update(f"{forced};".encode())
        digest.update(window.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
        name = digest.hexdigest()
        return self.directory / name[:2] / f"{name}.safetensors"

    def read(self, path: Path, expected: Optional["EntryExpectation"] = None) -> Optional[Dict[str, Tensor]]:
        """The entry's tensors, or None when it is missing, cannot be read or (given ``expected``) fails
        `entry_problem`; a failing entry gets one warning naming it, and is then recomputed by `fill`."""
        location = self.location(path)
        if not location.is_file():
            return None
        try:
            entry, record = _load_entry(location)
        except (SafetensorError, OSError, ValueError) as error:
            self._warn_once(location, f"cannot be read ({one_line(error)})")
            return None
        if expected is not None:
            problem = entry_problem(entry, record, expected)
            if problem is not None:
                self._warn_once(location, problem)
                return None
        return entry

    def location(self, path: Path) -> Path:
        """Where the entry named ``path`` (a path under ``directory``) is: in the temporary directory once the cache
        is unusable (`_fall_back`) and the entry was written there or the cache directory is a link, else ``path``."""
        if self._fallback is None or not path.is_relative_to(self.directory):
            return path
        moved = self._fallback / path.relative_to(self.directory)
        return moved if self._skip_directory or moved.is_file() else path

    def write(self, path: Path, tensors: Dict[str, Tensor]) -> None:
        """Write the entry named ``path`` (recording its name and forced text); into the temporary directory when the
        cache directory is a link or a write into it fails (read-only, full), with one warning."""
        # One metadata field: safetensors writes several in no fixed order, and equal entries should be equal files.
        record = json.dumps({"entry": path.stem, "forced": self._forced.get(path, ""), "version": FORMAT_VERSION})
        payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={RECORD: record})
        if self._fallback is None:
            try:
                self._write_into(self.directory, path, payload)
                return
            except OSError as error:
                self._fall_back(f"cannot be written ({_reason(error)})")
        self._write_into(self._fallback, self._fallback / path.relative_to(self.directory), payload)

    def _write_into(self, directory: Path, path: Path, payload: bytes) -> None:
        if not directory.joinpath("about.json").exists():
            atomic_write_text(directory / "about.json", json.dumps(self._about, indent=2) + "\n")
        atomic_write(path, lambda handle: handle.write(payload))

    def _avoid_links(self) -> None:
        """Neither read nor write a cache directory that is a link (it would choose where the run's files go, or
        what it trains on)."""
        if self._fallback is None and self._linked():
            self._skip_directory = True
            self._fall_back("is or lies in a symbolic link")

    def _linked(self) -> bool:
        """Whether the cache root, this teacher's directory or one of its folders is a symbolic link."""
        folders = [self.root, self.directory]
        if self.directory.is_dir() and not self.directory.is_symlink():
            folders += [child for child in self.directory.iterdir() if len(child.name) == 2]
        return any(folder.is_symlink() for folder in folders)

    def _fall_back(self, reason: str) -> None:
        """Use a temporary directory, removed at exit, for the rest of this run's entries (one warning)."""
        self._fallback_owner = tempfile.TemporaryDirectory(prefix="whisper-rope-teacher-targets-")
        self._fallback = Path(self._fallback_owner.name)
        logger.warning(
            "teacher cache %s %s: computing this run's teacher targets without caching them (kept in %s until the "
            "run ends); give --teacher-cache a writable directory to keep them",
            self.directory,
            reason,
            self._fallback,
        )

    def _warn_once(self, path: Path, problem: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("teacher cache entry %s %s; recomputing it", path, problem)

    def fill(
        self,
        dataset: SpeechDataset,
        device: torch.device,
        batch_size: int = 8,
        num_workers: int = 0,
        progress: bool = True,
        indices: Optional[Sequence[int]] = None,
    ) -> List[Optional[Path]]:
        """The entry of every clip of ``dataset``, computing the missing ones with the teacher.

        ``dataset`` must give the student's unpadded frames and the teacher's 30-s window (``teacher_30s``) or be
        padded to 30 s itself; a window over 30 s gets its halves' transcripts joined (`_fill_halves`).
        ``indices`` limits the work to those clips (a rank's share). Returns one path per
        dataset index; None for a clip not filled or whose audio could not be decoded (the dataset stands another
        clip in for it, whose entry is then used). Raises ValueError when the dataset
        cannot give the teacher its window.
        """
        if not (dataset.pad_30s or dataset.teacher_30s):
            raise ValueError("the teacher cache needs 30-s windows: load the dataset with teacher_30s=True")
        paths: List[Optional[Path]] = [None] * len(dataset)
        order = list(range(len(dataset))) if indices is None else list(indices)
        halved = [index for index in order if _split(dataset, index)]
        order = [index for index in order if not _split(dataset, index)]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        loader = make_loader(dataset, batches, num_workers=num_workers)
        computed = 0
        self._avoid_links()
        bar = PhaseProgress(len(order) + len(halved), "teacher targets", "clip", bar=progress)
        try:
            computed += self._fill_halves(dataset, halved, paths, device, bar)
            for batch in loader:
                windows = batch.mel if batch.padded_30s else batch.teacher_mel
                positions = self._positions(windows)
                missing = []
                for row, index in enumerate(batch.indices):
                    forced = self._forced_key(dataset, index)
                    path = self.entry_path(windows[row], forced)
                    paths[index], self._forced[path] = path, forced
                    expected = self._expectation(dataset, index, path, forced, positions[row])
                    if not self._complete(self.read(path, expected)):
                        missing.append(row)
                if missing:
                    self._compute(dataset, batch.indices, windows, missing, paths, device)
                    computed += len(missing)
                bar.update(len(batch.indices))
        finally:
            bar.close()
        self.computed = computed
        logger.info(
            "teacher targets: %d of %d clips computed, the rest read from %s", computed, len(dataset), self.directory
        )
        return [None if path is None else self.location(path) for path in paths]

    def _fill_halves(self, dataset: SpeechDataset, indices: Sequence[int], paths: list, device, bar) -> int:
        """Fill ``paths`` with the entries of the windows over 30 s at ``indices``, computing the missing ones (the
        teacher transcribes each 30-s half); returns how many it computed. A window whose audio cannot be decoded
        keeps no entry (the dataset stands another in), or raises `DataError` in strict mode."""
        computed = 0
        for index in indices:
            audio = dataset.decoded(index)
            if audio is None:
                bar.update(1)
                continue
            pieces = window_halves(dataset.examples[index], audio)
            halves = torch.stack([padded_window(half, dataset.n_mels) for half in pieces])
            forced = self._forced_key(dataset, index) + ":halves"
            path = self.entry_path(torch.cat(tuple(halves), dim=-1), forced)  # (n_mels, 6000): both halves
            paths[index], self._forced[path] = path, forced
            if self.read(path, self._expectation(dataset, index, path, forced, 0)) is None:
                tokens = torch.tensor(self._joined(dataset, index, halves.to(device)), dtype=torch.long)
                self.write(path, {"text_tokens": tokens})
                computed += 1
            bar.update(1)
        return computed

    @torch.no_grad()
    def _joined(self, dataset: SpeechDataset, index: int, halves: Tensor) -> List[int]:
        """The text tokens of a window over 30 s: its reference, or the teacher's transcripts of its two 30-s
        halves ``halves`` (2, n_mels, 3000) joined, cut to what the decoder's context holds after the prompt."""
        if self.spec.transcripts == "reference":
            return _text_of(*dataset.targets[index])
        first, second = self._transcripts(dataset, [index, index], self.teacher.eval().encoder(halves))
        head = len(dataset.prompts[index]) + len(dataset.tokenizer(index).sot_sequence_including_notimestamps)
        return (first + second)[: max(dataset.spec.n_text_ctx - head - 1, 0)]  # - 1: the EOT

    def _complete(self, entry: Optional[Dict[str, Tensor]]) -> bool:
        """Whether an entry holds every state kind this run needs (it may hold more)."""
        return entry is not None and all(key in entry for kind in self.spec.kinds for key in STORED_KEYS[kind])

    def _positions(self, windows: Tensor) -> List[int]:
        """The encoder positions an entry keeps for each window (b, n_mels, 3000): the clip's real ones (half its
        real frames, rounded up) and the margin, at most the teacher's n_audio_ctx."""
        real = (real_frame_counts(windows) + 1) // 2
        return (real + self.spec.margin).clamp(max=self.teacher.dims.n_audio_ctx).tolist()

    def _expectation(
        self, dataset: SpeechDataset, index: int, path: Path, forced: str, positions: int
    ) -> "EntryExpectation":
        dims = self.teacher.dims
        tokenizer = dataset.tokenizer(index)
        prompt = dataset.prompts[index]
        timestamps = dataset.timestamps(index)
        return EntryExpectation(
            name=path.stem,
            forced=forced,
            positions=positions,
            decoder_tokens=lambda text: len(target_sequence(tokenizer, text, prompt, timestamps)[0]),
            reference=_text_of(*dataset.targets[index]) if self.spec.transcripts == "reference" else None,
            n_vocab=min(dims.n_vocab, tokenizer.encoding.n_vocab),
            n_text_ctx=dims.n_text_ctx,
            text=(dims.n_text_layer, dims.n_text_state),
            audio=(dims.n_audio_layer, dims.n_audio_state),
        )

    def _forced_key(self, dataset: SpeechDataset, index: int) -> str:
        prompt = dataset.prompts[index]
        if self.spec.transcripts == "teacher":
            # Windows that draw timestamp targets are transcribed with timestamps: another key, another entry.
            stamps = ":timestamps" if dataset.timestamps(index) else ""
            branch = dataset.branch(index)
            branched = "" if branch is None else f":branch{branch:.9f}"
            return f"teacher:{dataset.languages[index]}:{dataset.spec.task}:{prompt}{stamps}{branched}"
        return f"reference:{dataset.targets[index][0]}"

    @torch.no_grad()
    def _compute(self, dataset, indices, windows, rows, paths, device) -> None:
        teacher = self.teacher.eval()
        windows = windows[rows].to(device)
        kinds = set(self.spec.kinds)
        for row in rows:  # keep what other runs stored in these entries
            entry = self.read(paths[indices[row]]) or {}
            kinds.update(kind for kind, keys in STORED_KEYS.items() if all(key in entry for key in keys))
        # Encoder states are kept for the clip's real positions and the margin: what an unpadded student has, and
        # what a padded one is compared on.
        real = (real_frame_counts(windows) + 1) // 2
        positions = (real + self.spec.margin).clamp(max=teacher.dims.n_audio_ctx).tolist()
        clips = [indices[r] for r in rows]
        recorder = StateRecorder(recorded_modules(teacher, tuple(kinds)))
        with recorder:
            audio = teacher.encoder(windows)
        # Decoding takes the encoded windows as they are (upstream skips its encoder for features of this shape).
        if self.spec.transcripts == "teacher":
            text_tokens = self._transcripts(dataset, clips, audio)
            text_tokens = [
                text if dataset.branch(index) is None else self._branched(dataset, index, audio[i : i + 1], text)
                for i, (index, text) in enumerate(zip(clips, text_tokens))
            ]
        else:
            text_tokens = [_text_of(*dataset.targets[index]) for index in clips]
        sequences = [
            target_sequence(dataset.tokenizer(index), text, dataset.prompts[index], dataset.timestamps(index))[0]
            for index, text in zip(clips, text_tokens)
        ]
        tokens = pad_token_rows(sequences, dataset.tokenizer(clips[0]).eot).to(device)
        with recorder:
            teacher.decoder(tokens, audio)
        states = stacked_states(recorder, audio if "encoder_output" in kinds else None)
        for i, index in enumerate(clips):
            entry = {"text_tokens": torch.tensor(text_tokens[i], dtype=torch.long)}
            entry.update(_clip_states(states, i, len(sequences[i]), positions[i]))
            self.write(paths[index], entry)

    def _transcripts(self, dataset: SpeechDataset, clips: List[int], audio: Tensor) -> List[List[int]]:
        """The teacher's greedy transcripts (text tokens, with timestamp tokens for clips whose targets carry
        them) of its encoded windows ``audio`` (b, n_audio_ctx, d), decoded per language, prompt and timestamps."""
        groups: Dict[Tuple[str, Optional[str], bool], List[int]] = {}
        for i, index in enumerate(clips):
            key = (dataset.languages[index], dataset.examples[index].prompt, dataset.timestamps(index))
            groups.setdefault(key, []).append(i)
        transcripts: Dict[int, List[int]] = {}
        for (language, prompt, timestamps), members in groups.items():
            options = DecodingOptions(
                language=language, task=dataset.spec.task, without_timestamps=not timestamps, fp16=False, prompt=prompt
            )
            for i, result in zip(members, self.teacher.decode(audio[members], options)):
                index = clips[i]
                tokenizer = dataset.tokenizer(index)
                sot = tokenizer.sot_sequence if timestamps else tokenizer.sot_sequence_including_notimestamps
                head = len(dataset.prompts[index]) + len(sot)
                transcripts[i] = list(result.tokens)[: max(dataset.spec.n_text_ctx - head, 0)]
        return [transcripts[i] for i in range(len(clips))]

    @torch.no_grad()
    def _branched(self, dataset: SpeechDataset, index: int, audio: Tensor, text: List[int]) -> List[int]:
        """The teacher's transcript of a branched window (`Window.branch`; targets without timestamps): its greedy
        ``text`` up to the drawn text token, there the teacher's best other text token, then what the teacher
        decodes after that prefix. ``audio``: (1, n_audio_ctx, d), the window encoded. A transcript without text
        tokens stays as it is."""
        tokenizer = dataset.tokenizer(index)
        words = [j for j, token in enumerate(text) if token < tokenizer.eot]
        if not words:
            return text
        at = words[min(int(dataset.branch(index) * len(words)), len(words) - 1)]
        tokens, _ = target_sequence(tokenizer, text, dataset.prompts[index])
        head = len(tokens) - len(text)  # prompt and SOT sequence: position head - 1 + j predicts text[j]
        scores = self.teacher.decoder(torch.tensor([tokens], device=audio.device), audio)[0, head - 1 + at].float()
        scores[tokenizer.eot :] = float("-inf")  # a word, not an end or a timestamp
        scores[text[at]] = float("-inf")
        prefix = text[:at] + [int(scores.argmax())]
        options = DecodingOptions(
            language=dataset.languages[index],
            task=dataset.spec.task,
            without_timestamps=True,
            fp16=False,
            prompt=dataset.examples[index].prompt,
            prefix=prefix,
        )
        after = list(self.teacher.decode(audio, options)[0].tokens)
        return (prefix + after)[: max(dataset.spec.n_text_ctx - head, 0)]


def _split(dataset: SpeechDataset, index: int) -> bool:
    """Whether example ``index`` is a window over 30 s (`Window.split`): the teacher reads it in two halves."""
    return getattr(dataset.examples[index], "split", None) is not None


def _text_of(tokens: Sequence[int], labels: Sequence[int]) -> List[int]:
    """The text tokens of a `target_sequence`: its labelled positions without the final EOT."""
    return [label for label in labels if label != IGNORE_INDEX][:-1]


def _clip_states(states: Dict[str, Tensor], row: int, n_tokens: int, n_positions: int) -> Dict[str, Tensor]:
    """One clip's states, cut to its tokens / positions, in fp16: (layers, t, d) or (n, d) / (layers, n, d)."""
    entry = {}
    for key, value in states.items():
        if key == "encoder_output":
            entry[key] = value[row, :n_positions]
        elif key.startswith("encoder"):
            entry[key] = value[:, row, :n_positions]
        else:
            entry[key] = value[:, row, :n_tokens]
    return {k: v.to(torch.float16) for k, v in entry.items()}


def read_entry(path: Path, keys: Optional[AbstractSet[str]] = None) -> Optional[Dict[str, Tensor]]:
    """An entry's tensors (with ``keys``: only those and the transcript, the rest is not read from disk); None when
    the file is missing, and None with a warning when it is damaged."""
    if not path.is_file():
        return None
    try:
        return _load_entry(path, keys)[0]
    except (SafetensorError, OSError, ValueError) as error:
        logger.warning("teacher cache entry %s cannot be read (%s); recomputing it", path, one_line(error))
        return None


def _load_entry(path: Path, keys: Optional[AbstractSet[str]] = None) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(the entry's tensors, or only ``keys`` and the transcript; the record of what it was written for, {} when
    it has none or it is not a JSON object)."""
    with safe_open(str(path), framework="pt") as entry:
        wanted = None if keys is None else keys | {"text_tokens"}
        tensors = {key: entry.get_tensor(key) for key in entry.keys() if wanted is None or key in wanted}
        text = (entry.metadata() or {}).get(RECORD, "")
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return tensors, record if isinstance(record, dict) else {}


@dataclass(frozen=True)
class EntryExpectation:
    """What one clip's entry must hold to be used.

    name: the entry's file name (without suffix), recorded in the entry; forced: the text its tokens were forced
    with, recorded too; positions: the encoder positions kept for the clip; decoder_tokens: the decoder positions
    of a transcript (text tokens -> count); reference: the text tokens the entry must hold (reference transcripts;
    None for the teacher's own); n_vocab: token ids must be below it; n_text_ctx: the decoder's context; text,
    audio: (layers, width) of the decoder and the encoder.
    """

    name: str
    forced: str
    positions: int
    decoder_tokens: Callable[[List[int]], int]
    reference: Optional[List[int]]
    n_vocab: int
    n_text_ctx: int
    text: Tuple[int, int]
    audio: Tuple[int, int]

    def shapes(self, n_tokens: int) -> Dict[str, Tuple[int, ...]]:
        """The shape of every state an entry may hold, for a transcript of ``n_tokens`` decoder positions."""
        (text_layers, text_width), (audio_layers, audio_width) = self.text, self.audio
        return {
            "decoder_layers": (text_layers + 1, n_tokens, text_width),
            "decoder_attention": (text_layers, n_tokens, text_width),
            "encoder_output": (self.positions, audio_width),
            "encoder_layers": (audio_layers, self.positions, audio_width),
            "encoder_attention": (audio_layers, self.positions, audio_width),
        }


def entry_problem(entry: Dict[str, Tensor], record: Dict[str, Any], expected: EntryExpectation) -> Optional[str]:
    """What makes a read entry unusable for ``expected`` (words for a warning), or None when it is sound: another
    entry's name or forced text recorded in it (a foreign or renamed file, an older format), a transcript that is
    not int64 ids in the vocabulary fitting the decoder's context, a state of the wrong dtype or shape, or a
    non-finite value."""
    if record.get("entry") != expected.name or record.get("forced") != expected.forced:
        return "was written for another clip or transcript (its recorded name or forced text differ)"
    text = entry.get("text_tokens")
    if text is None or text.dtype != torch.int64 or text.ndim != 1:
        return "holds no transcript of int64 token ids"
    if text.numel() and not (0 <= int(text.min()) and int(text.max()) < expected.n_vocab):
        return f"holds token ids outside the vocabulary of {expected.n_vocab}"
    if expected.reference is not None and text.tolist() != expected.reference:
        return "holds another transcript than the clip's reference"
    n_tokens = expected.decoder_tokens(text.tolist())
    if n_tokens > expected.n_text_ctx:
        return f"holds a transcript of {n_tokens} tokens, more than the decoder's {expected.n_text_ctx}"
    for key, shape in expected.shapes(n_tokens).items():
        value = entry.get(key)
        if value is None:
            continue
        if value.dtype != torch.float16 or tuple(value.shape) != shape:
            return f"holds {key} {value.dtype} {tuple(value.shape)}, expected float16 {shape}"
        if not torch.isfinite(value).all():
            return f"holds non-finite values in {key}"
    return None


def _reason(error: OSError) -> str:
    """An OS error in words: its strerror (read-only file system, no space left on device ...) or its message."""
    return error.strerror or errno.errorcode.get(error.errno or 0, "") or one_line(error)


class TeacherTargetsDataset(torch.utils.data.Dataset):
    """A `SpeechDataset` whose items carry their teacher targets, read from the cache in the DataLoader workers.

    With ``transcripts == "teacher"`` the item's tokens and labels are the teacher's transcript (label-free).
    ``kinds`` (state kinds of `losses.STATE_KINDS`; None: all an entry holds) selects the states an item carries:
    an entry may hold more kinds than this run asks for (the cache stores the union of what runs needed), and
    every item of a batch must carry the same ones. Every other attribute is the wrapped dataset's.
    """

    def __init__(
        self,
        dataset: SpeechDataset,
        entries: Sequence[Optional[Path]],
        transcripts: str,
        kinds: Optional[Sequence[str]] = None,
    ):
        self.dataset = dataset
        self.entries = list(entries)
        self.transcripts = transcripts
        self.keys = None if kinds is None else frozenset(key for kind in kinds for key in STORED_KEYS[kind])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name in ("dataset", "entries", "transcripts", "keys"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Item:
        item = self.dataset[index]
        path = self.entries[item.index]
        entry = read_entry(path, self.keys) if path is not None else None
        if entry is None:
            raise DataError(
                f"{self.dataset.source}: the teacher targets of row {self.dataset.examples[item.index].row} "
                f"disappeared from the cache ({path}); run again to recompute them"
            )
        text = entry.pop("text_tokens").tolist()
        if self.transcripts == "teacher":
            tokenizer = self.dataset.tokenizer(item.index)
            tokens, labels = target_sequence(
                tokenizer, text, self.dataset.prompts[item.index], self.dataset.timestamps(item.index)
            )
            item.tokens, item.labels = torch.tensor(tokens), torch.tensor(labels)
        item.teacher_states = entry
        return item


class TeacherTargetsCollator:
    """`Collator` plus the teacher states, zero-padded like the batch: decoder states to its token width, encoder
    states to its audio positions (picklable, for DataLoader workers). A window over 30 s has no states: its rows
    are zeros, and ``teacher_rows`` (b,) is False there, so that only its cross-entropy counts."""

    def __init__(self, base: Collator):
        self.base = base

    def __call__(self, items: Sequence[Item]):
        batch = self.base(items)
        n_tokens, n_positions = batch.tokens.shape[1], batch.mel.shape[-1] // 2
        has = [bool(item.teacher_states) for item in items]
        states: Dict[str, Tensor] = {}
        for key, first in (next((i.teacher_states for i in items if i.teacher_states), {})).items():
            width = n_positions if key.startswith("encoder") else n_tokens
            empty = first[..., :0, :]  # a window over 30 s: no positions
            values = [item.teacher_states.get(key, empty) for item in items]
            states[key] = _pad_states(values, width, stacked=first.ndim == 3)
        stored = [_stored_positions(i.teacher_states, n_positions) if h else 0 for i, h in zip(items, has)]
        batch.teacher_states = states
        batch.teacher_positions = torch.tensor(stored, dtype=torch.long)
        batch.teacher_rows = torch.tensor(has, dtype=torch.bool)
        return batch


def _stored_positions(states: Dict[str, Tensor], width: int) -> int:
    """How many audio positions a clip's encoder states hold (at most ``width``); ``width`` if it has none."""
    for key in ("encoder_output", "encoder_layers", "encoder_attention"):
        if key in states:
            return min(states[key].shape[-2], width)
    return width


def _pad_states(states: Sequence[Tensor], width: int, stacked: bool) -> Tensor:
    """Clips' (layers, n_i, d) or (n_i, d) states -> (layers, b, width, d) or (b, width, d), zeros after n_i."""
    first = states[0]
    shape = (first.shape[0], len(states), width, first.shape[-1]) if stacked else (len(states), width, first.shape[-1])
    out = torch.zeros(shape, dtype=first.dtype)
    for row, value in enumerate(states):
        n = min(value.shape[-2], width)
        if stacked:
            out[:, row, :n] = value[:, :n]
        else:
            out[row, :n] = value[:n]
    return out
