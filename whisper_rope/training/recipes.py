"""Recipes: named sets of `FinetuneConfig` defaults for one goal, the best settings measured on tiny.en
(docs/results.md, "Unpadded decoding that keeps what tiny.en knew").

``whisper-rope finetune --recipe NAME --model M --train AUDIO_FOLDER`` takes a recipe's values for every option not
given on the command line; ``FinetuneConfig.from_recipe(NAME, **overrides)`` does the same in Python. A recipe's
step counts (warm-up, the transplant's fade) are fractions of its run, so ``--steps 20`` gives a short run of the
same shape that still ends as the model the recipe promises; its hold-out is a share of the clips, at most 24.

Both recipes here adapt a checkpoint to *unpadded* decoding (each clip's own frames instead of a 30-s window) from
untranscribed audio: the frozen source model, fed the 30-s window, is the teacher; its transcript is the target
sequence, and the student matches its hidden states (every decoder layer on the teacher-forced tokens; for the rotary
recipe also the encoder's output on the clip's own positions, for the sliced one also the teacher's token
distributions) — no labels anywhere.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

#: `FinetuneConfig` fields that count optimizer steps: a recipe gives them as fractions of its run (`Recipe.shares`),
#: so that a run shortened or lengthened with --steps keeps the recipe's shape (its fade ends, its warm-up ends).
STEP_COUNTS = (
    "warmup_steps",
    "transplant_anneal_start",
    "transplant_anneal_steps",
    "transplant_gate_start",
    "transplant_gate_steps",
    "stage_steps",
    "eval_every",
    "save_every",
)


@dataclass(frozen=True)
class Recipe:
    """summary: one line for ``--help``; defaults: `FinetuneConfig` field values; shares: step counts
    (`STEP_COUNTS`) as fractions of the run's --steps, rounded, at least 1."""

    summary: str
    defaults: Dict[str, Any]
    shares: Dict[str, float] = field(default_factory=dict)


_LABEL_FREE = {
    "distill_only": True,
    "ce_weight": 0.0,
    "distill_weight": 0.0,
    "distill_decoder_layers": 1.0,
    "unpadded": True,
    "batch_size": 8,
    "num_workers": 1,
    "eval_holdout": None,  # a share of the clips, at most 24 (`holdout.default_holdout`)
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
            "distill_encoder_weight": 1.0,
            "steps": 1500,
            "lr": 1e-4,
            "lr_positional": 3e-4,
        },
        shares={"transplant_anneal_steps": 300 / 1500, "warmup_steps": 20 / 1500},
    ),
    "unpadded-sliced": Recipe(
        summary=(
            "keep upstream's sinusoid table, sliced to each clip's frames (whisper.cpp's audio_ctx), adapted to "
            "unpadded input from untranscribed audio: the baseline a rotary encoder must match"
        ),
        # A margin of 1 s of the padding after each input: fed only its own frames, a sliced model (tiny.en too)
        # loops on a 1.55-s real clip; with the margin it does not (docs/results.md, "The margin"). The KL term on
        # the teacher's token distributions (temperature 2) makes the student end fewer 5-20-s windows after their
        # first sentence than the hidden states alone (docs/results.md, "A fresh draw"); still, it ends the text a
        # fifth of a nat more eagerly than the source at sentence ends, and an end-of-text penalty at decoding
        # (windows that hold their audio's end) moves those ends back: 1 nat greedily, 2 under transcribe's beam
        # search as well (docs/results.md, "The end-of-text penalty").
        defaults={
            **_LABEL_FREE,
            "variant": "whisper",
            "steps": 300,
            "lr": 3e-5,
            "unpadded_margin": 50,
            "distill_weight": 1.0,
            "eot_penalty": 2.0,
        },
        shares={"warmup_steps": 20 / 300},
    ),
}


def recipe_defaults(name: Optional[str], steps: Optional[int] = None) -> Dict[str, Any]:
    """The field values of recipe ``name`` (with ``recipe`` itself) for a run of ``steps`` optimizer steps (None:
    the recipe's own), its step counts scaled to them; {} for None. Raises ValueError for an unknown name."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    steps = recipe.defaults["steps"] if steps is None else steps
    counts = {key: max(1, round(share * steps)) for key, share in recipe.shares.items()}
    return {**recipe.defaults, **counts, "recipe": name}
