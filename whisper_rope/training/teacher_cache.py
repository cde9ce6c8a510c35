"""What a frozen teacher says about each clip, computed once and kept on disk.

A distillation teacher is frozen and, without augmentation of its input, its targets are a pure function of the
clip: the teacher's transcript (for label-free training), its hidden states on the teacher-forced tokens and its
encoder states on the clip's positions. Recomputing them every epoch costs a 30-s window through the teacher's
encoder per clip — on a 2-core CPU more than the student's own step. `TeacherCache.fill` computes every missing
entry once (batched, with a progress bar); training then reads entries in its DataLoader workers.

An entry is one safetensors file (fp16 states, int64 tokens) named by a SHA-256 over

* the teacher: its variant, dims, table scales and every tensor of its state dict (`teacher_fingerprint`);
* the options: which states, the unpadded margin, where the transcript comes from, the format version;
* the clip: its 30-s log-mel window (a function of its audio), its position count and the text it is forced with.

Any change of these gives another name, so a stale entry is never read; writes are atomic, and an entry that fails
to read is recomputed with a warning.
"""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AbstractSet, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm import tqdm
from whisper.decoding import DecodingOptions

from ..atomic import atomic_write, atomic_write_text
from ..data import IGNORE_INDEX, Collator, DataError, Item, SpeechDataset, make_loader, pad_token_rows, target_sequence
from ..features import real_frame_counts
from ..model import WhisperRope
from .losses import StateRecorder, recorded_modules, stacked_states

logger = logging.getLogger("whisper_rope")

FORMAT_VERSION = 1
TRANSCRIPTS = ("reference", "teacher")
#: The tensors an entry holds for each state kind.
STORED_KEYS = {
    "decoder_layers": ("decoder_layers",),
    "encoder_output": ("encoder_output",),
    "encoder_layers": ("encoder_layers",),
    "attention": ("encoder_attention", "decoder_attention"),
}


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
        "table_scale": [teacher.encoder.table_scale, teacher.decoder.table_scale],
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

    def entry_path(self, window: Tensor, forced: str) -> Path:
        """The file of one clip: ``window`` its (n_mels, 3000) log-mel, ``forced`` what determines the forced tokens
        (the reference tokens and prompt, or the language, task and prompt the teacher transcribes with)."""
        digest = hashlib.sha256(self.scope.encode())
        digest.update(f"{forced};".encode())
        digest.update(window.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
        name = digest.hexdigest()
        return self.directory / name[:2] / f"{name}.safetensors"

    def read(self, path: Path) -> Optional[Dict[str, Tensor]]:
        """The entry's tensors, or None when it is missing or cannot be read (then it is recomputed)."""
        return read_entry(path)

    def write(self, path: Path, tensors: Dict[str, Tensor]) -> None:
        if not self.directory.joinpath("about.json").exists():
            atomic_write_text(self.directory / "about.json", json.dumps(self._about, indent=2) + "\n")
        payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write(path, lambda handle: handle.write(payload))

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
        padded to 30 s itself. ``indices`` limits the work to those clips (a rank's share). Returns one path per
        dataset index; None for a clip not filled or whose audio could not be decoded (the dataset stands another
        clip in for it, whose entry is then used). Raises ValueError when the dataset
        cannot give the teacher its window.
        """
        if not (dataset.pad_30s or dataset.teacher_30s):
            raise ValueError("the teacher cache needs 30-s windows: load the dataset with teacher_30s=True")
        paths: List[Optional[Path]] = [None] * len(dataset)
        order = list(range(len(dataset))) if indices is None else list(indices)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        loader = make_loader(dataset, batches, num_workers=num_workers)
        computed = 0
        bar = tqdm(total=len(order), desc="teacher targets", unit="clip", disable=not progress, dynamic_ncols=True)
        try:
            for batch in loader:
                windows = batch.mel if batch.padded_30s else batch.teacher_mel
                missing = []
                for row, index in enumerate(batch.indices):
                    path = self.entry_path(windows[row], self._forced_key(dataset, index))
                    paths[index] = path
                    if not self._complete(self.read(path)):
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
        return paths

    def _complete(self, entry: Optional[Dict[str, Tensor]]) -> bool:
        """Whether an entry holds every state kind this run needs (it may hold more)."""
        return entry is not None and all(key in entry for kind in self.spec.kinds for key in STORED_KEYS[kind])

    def _forced_key(self, dataset: SpeechDataset, index: int) -> str:
        prompt = dataset.prompts[index]
        if self.spec.transcripts == "teacher":
            # Windows that draw timestamp targets are transcribed with timestamps: another key, another entry.
            stamps = ":timestamps" if dataset.timestamps(index) else ""
            return f"teacher:{dataset.languages[index]}:{dataset.spec.task}:{prompt}{stamps}"
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
        if keys is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as entry:
            wanted = keys | {"text_tokens"}
            return {key: entry.get_tensor(key) for key in entry.keys() if key in wanted}
    except (SafetensorError, OSError, ValueError) as error:
        logger.warning("teacher cache entry %s cannot be read (%s); recomputing it", path, error)
        return None


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
    states to its audio positions (picklable, for DataLoader workers)."""

    def __init__(self, base: Collator):
        self.base = base

    def __call__(self, items: Sequence[Item]):
        batch = self.base(items)
        n_tokens, n_positions = batch.tokens.shape[1], batch.mel.shape[-1] // 2
        states: Dict[str, Tensor] = {}
        for key, first in items[0].teacher_states.items():
            width = n_positions if key.startswith("encoder") else n_tokens
            states[key] = _pad_states([item.teacher_states[key] for item in items], width, stacked=first.ndim == 3)
        stored = [_stored_positions(item.teacher_states, n_positions) for item in items]
        batch.teacher_states = states
        batch.teacher_positions = torch.tensor(stored, dtype=torch.long)
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
