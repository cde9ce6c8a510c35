"""Data: manifests (`manifest`) and the datasets, batches and samplers built from them (`dataset`).

Everything the single ``whisper_rope.data`` module offered is importable from here.
"""

from ..features import unpadded_features
from .dataset import (
    IGNORE_INDEX,
    Batch,
    BucketBatchSampler,
    Collator,
    Item,
    SpeechDataset,
    TokenizerSpec,
    composed_dataset,
    eval_batches,
    load_examples,
    make_loader,
    pad_token_rows,
    prompt_tokens,
    spec_augment_,
    target_sequence,
)
from .manifest import (
    AUDIO_SUFFIXES,
    MANIFEST_SUFFIXES,
    MAX_CLIP_SECONDS,
    MIN_CLIP_SECONDS,
    DataError,
    Example,
    Manifest,
    Problem,
    check_audio,
    language_code,
    read_manifest,
)
from .windows import Piece, Window, WindowPlan, compose_windows, window_audio, window_seconds

__all__ = [
    "AUDIO_SUFFIXES",
    "Batch",
    "BucketBatchSampler",
    "Collator",
    "DataError",
    "Example",
    "IGNORE_INDEX",
    "Item",
    "MANIFEST_SUFFIXES",
    "MAX_CLIP_SECONDS",
    "MIN_CLIP_SECONDS",
    "Manifest",
    "Problem",
    "SpeechDataset",
    "TokenizerSpec",
    "Piece",
    "Window",
    "WindowPlan",
    "check_audio",
    "compose_windows",
    "composed_dataset",
    "eval_batches",
    "language_code",
    "load_examples",
    "make_loader",
    "pad_token_rows",
    "prompt_tokens",
    "read_manifest",
    "spec_augment_",
    "target_sequence",
    "unpadded_features",
    "window_audio",
    "window_seconds",
]
