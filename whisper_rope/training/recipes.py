"""Recipes: named sets of `FinetuneConfig` defaults for one goal, the best settings measured on tiny.en
(docs/results.md, "Unpadded decoding that keeps what tiny.en knew").

``whisper-rope finetune --recipe NAME --model M --train AUDIO_FOLDER`` takes a recipe's values for every option not
given on the command line; ``FinetuneConfig.from_recipe(NAME, **overrides)`` does the same in Python.

Both recipes here adapt a checkpoint to *unpadded* decoding (each clip's own frames instead of a 30-s window) from
untranscribed audio: the frozen source model, fed the 30-s window, is the teacher; its transcript is the target
sequence, and the student matches its hidden states (every decoder layer on the teacher-forced tokens, and the
encoder's output on the clip's own positions) — no labels anywhere.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass(frozen=True)
class Recipe:
    """summary: one line for ``--help``; defaults: `FinetuneConfig` field values."""

    summary: str
    defaults: Dict[str, Any]


_LABEL_FREE = {
    "distill_only": True,
    "ce_weight": 0.0,
    "distill_weight": 0.0,
    "distill_decoder_layers": 1.0,
    "unpadded": True,
    "batch_size": 8,
    "num_workers": 1,
    "eval_holdout": 24,
    "windows": "every-length",
}

RECIPES: Dict[str, Recipe] = {
    "unpadded-rotary": Recipe(
        summary=(
            "a rotary encoder (rotary/learned) that transcribes unpadded, from untranscribed audio: the encoder's "
            "sinusoid table, sliced to each clip, fades out while gated RoPE fades in"
        ),
        defaults={
            **_LABEL_FREE,
            "variant": "rotary/learned",
            "transplant": True,
            "transplant_anneal_steps": 300,
            "distill_encoder_weight": 1.0,
            "steps": 1500,
            "lr": 1e-4,
            "lr_positional": 3e-4,
            "warmup_steps": 20,
        },
    ),
    "unpadded-sliced": Recipe(
        summary=(
            "keep upstream's sinusoid table, sliced to each clip's frames (whisper.cpp's audio_ctx), adapted to "
            "unpadded input from untranscribed audio: the baseline a rotary encoder must match"
        ),
        defaults={**_LABEL_FREE, "variant": "whisper", "steps": 300, "lr": 3e-5, "warmup_steps": 20},
    ),
}


def recipe_defaults(name: Optional[str]) -> Dict[str, Any]:
    """The field values of recipe ``name`` (with ``recipe`` itself); {} for None. Raises ValueError for an unknown
    name."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return {**RECIPES[name].defaults, "recipe": name}
