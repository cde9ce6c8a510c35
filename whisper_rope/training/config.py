"""`FinetuneConfig`: every setting of a fine-tuning run, the one declaration that the Python API and the
``whisper-rope finetune`` options (`whisper_rope.cli.arguments`) are both built from."""

from dataclasses import dataclass
from typing import Optional

from ..fields import (
    BATCH,
    EOT_PENALTY,
    LEARNING_RATE,
    MAX_COUNT,
    SEED,
    THREADS,
    UNPADDED_MARGIN,
    WORKERS,
    Bounds,
    PathText,
    check_bounds,
    check_device,
    opt,
)
from ..positional import ROTARY_THETA
from ..variants import parse_variant
from ..weights.loading import DEVICE_HELP, ROTARY_THETA_HELP, THREADS_HELP
from .optim import check_policy
from .recipes import RECIPES, recipe_defaults
from .transplant import transplant_start_variant

#: Whole numbers of steps (or of clips) counted from 0 (none) or from 1.
STEPS = Bounds.integers(0, MAX_COUNT)
AT_LEAST_ONE_STEP = Bounds.integers(1, MAX_COUNT)
#: Weights of the loss terms: beyond 1000 a term swamps the others and fp16 losses overflow.
LOSS_WEIGHT = Bounds.reals(0, 1000)

#: Settings that do not change the training trajectory: a resumed run may differ in these.
BOOKKEEPING = {
    "output",
    "resume",
    "steps",
    "progress",
    "save_every",
    "save_dtype",
    "keep_last",
    "log_every",
    "eval_every",
    "eval_at_start",
    "eval",
    "num_workers",
    "threads",
    "device",
    "strict",
    "teacher_cache",
    "recipe",
}

#: Settings a resumed run cannot apply, with why: it is refused rather than told they apply.
FIXED_ON_RESUME = {
    "seed": "the random states come back from the checkpoint",
    "batch_size": "the sampler's position counts the checkpoint's batches",
}


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; the ``whisper-rope finetune`` options are built from these fields."""

    # What to train.
    recipe: Optional[str] = opt(
        None,
        "a tested set of defaults for one goal (options given explicitly still win): "
        + "; ".join(f"{name}: {recipe.summary}" for name, recipe in RECIPES.items()),
        choices=tuple(RECIPES),
    )
    model: PathText = opt(
        "tiny.en",
        "pretrained or fine-tuned weights: a model name (tiny.en ... large-v3-turbo), a .pt checkpoint, or a "
        "faster-whisper / Hugging Face directory; also the distillation teacher unless --teacher names one",
    )
    teacher: Optional[PathText] = opt(
        None,
        "the distillation teacher, loaded as upstream's whisper variant (default: --model): e.g. the source model "
        "when --model is a checkpoint already adapted that is to adapt further",
    )
    variant: Optional[str] = opt(
        None, "positional variant to train (a preset such as rotary, or ENCODER/DECODER); default: the checkpoint's own"
    )
    rotary_theta: Optional[float] = opt(None, ROTARY_THETA_HELP, bounds=ROTARY_THETA)
    gated_rotary: Optional[bool] = opt(
        None, "learn a per-head gate (initialised to 0) that mixes RoPE in; default: the checkpoint's"
    )
    train: Optional[PathText] = opt(
        None,
        "training manifest (.jsonl/.csv/.tsv with audio,text[,language,start,end,prompt]) or a directory of audio "
        "files with same-named .txt transcripts",
    )
    eval: Optional[PathText] = opt(
        None,
        "evaluation manifest (like --train: .jsonl/.csv/.tsv or a folder of audio files with .txt transcripts): "
        "validation loss and greedy WER/CER every --eval-every steps and at the end",
    )
    output: PathText = opt(
        "finetune-output",
        "output directory: checkpoints, logs, curves; new, empty or an earlier fine-tune's, locked while the run "
        "uses it",
        flags=("-o",),
    )
    language: Optional[str] = opt(None, "language of rows that name none (multilingual models; default en)")
    task: str = opt("transcribe", "task token of multilingual models", choices=("transcribe", "translate"))

    # Optimisation.
    steps: int = opt(1000, "optimizer steps to train for (in total, when resuming)", bounds=AT_LEAST_ONE_STEP)
    batch_size: int = opt(
        8, "clips per forward pass over all processes (a multiple of the number of processes)", bounds=BATCH
    )
    grad_accum: int = opt(
        1,
        "forward passes accumulated per optimizer step (clips per step: batch_size * grad_accum)",
        bounds=Bounds.integers(1, 1024),
    )
    lr: float = opt(1e-5, "peak learning rate (AdamW)", bounds=LEARNING_RATE)
    lr_positional: Optional[float] = opt(
        None,
        "peak learning rate of the positional path (self-attention query/key projections, rotary gates, learned "
        "positional tables), which a positional change invalidates; default: --lr",
        bounds=LEARNING_RATE,
    )
    warmup_steps: Optional[int] = opt(
        None, "steps of linear learning-rate warm-up from zero (default: a tenth of --steps, at most 50)", bounds=STEPS
    )
    schedule: str = opt("cosine", "learning-rate decay after warm-up, to zero at --steps", choices=("cosine", "linear"))
    weight_decay: float = opt(
        0.01,
        "AdamW weight decay, applied to matrices only (biases, norms and gates are not decayed)",
        bounds=Bounds.reals(0, 1),
    )
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping)", bounds=Bounds.reals(0))
    label_smoothing: float = opt(
        0.0, "label smoothing of the token cross-entropy", bounds=Bounds.reals(0, 1, high_open=True)
    )
    train_policy: str = opt(
        "all",
        "which parameters train: all, positional (positional parameters and attention), decoder, encoder, or a "
        "regular expression searched in parameter names; newly initialised parameters (rotary gates, "
        "re-initialised tables) always train",
    )
    stage_steps: int = opt(
        0,
        "train only --stage-policy for this many first steps, then every parameter --train-policy selects",
        bounds=STEPS,
    )
    stage_policy: str = opt(
        "positional-path", "what trains during the first --stage-steps steps (a --train-policy value)"
    )
    precision: str = opt(
        "auto",
        "auto: bf16 autocast on CUDA where supported, else fp16 with a gradient scaler; fp32 on the CPU",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    gradient_checkpointing: bool = opt(
        False, "recompute each residual block in the backward pass (less memory, about a third more compute)"
    )
    spec_augment: bool = opt(
        False,
        "SpecAugment: mask 2 frequency bands (up to 27 mel bins) and 2 time spans (up to 40 frames, 10%% of the clip)",
    )

    # Data.
    unpadded: Optional[bool] = opt(
        None,
        "train on each clip's own frames (length-bucketed batches); an encoder with a sinusoid table then adds "
        "its rows 0..n-1 to n positions (the sliced table). Default: yes for encoders without a table",
    )
    unpadded_margin: int = opt(
        0, "padding positions (20 ms each) an unpadded encoder keeps after each clip", bounds=UNPADDED_MARGIN
    )
    eot_penalty: float = opt(
        0.0,
        "nats the model takes off the end-of-text logit when decoding a window that holds its audio's end, stored "
        "in its checkpoint: an adapted model ends the text a little more eagerly than its source at sentence ends "
        "(training itself is unchanged; validation and the final table decode with it)",
        bounds=EOT_PENALTY,
    )
    windows: str = opt(
        "clips",
        "what a training example is: clips (each clip of --train, as given) or every-length (clips joined with "
        "pauses and recordings over 30 s cut at their pauses into windows of 1-30 s, the lengths drawn evenly; "
        "see --single-clip-share, --clip-part-share, --window-sets)",
        choices=("clips", "every-length"),
    )
    single_clip_share: float = opt(
        0.15, "with --windows every-length: the share of windows that stay one clip", bounds=Bounds.reals(0, 1)
    )
    clip_part_share: float = opt(
        0.08,
        "with --windows every-length and teacher transcripts: the share of windows that are the first or last 1-3 s "
        "of one clip, cut at a quiet point (inputs shorter than whole clips)",
        bounds=Bounds.reals(0, 1),
    )
    window_sets: int = opt(
        2,
        "with --windows every-length: how many different compositions of the clips to train on (seeded)",
        bounds=Bounds.integers(1, 100),
    )
    timestamp_share: float = opt(
        0.5,
        "with --windows every-length and teacher transcripts: the share of windows whose targets carry timestamp "
        "tokens (as transcribe decodes), the rest without (as evaluate and short clips)",
        bounds=Bounds.reals(0, 1),
    )
    previous_text_share: float = opt(
        0.3,
        "with --windows every-length and teacher transcripts: the share of windows decoded after the teacher's "
        "transcript of the window before them as a prompt, as transcribe conditions each 30-s window on the text "
        "before it",
        bounds=Bounds.reals(0, 1),
    )
    branch_share: float = opt(
        0.0,
        "with --windows every-length and teacher transcripts: the share of windows without timestamp targets whose "
        "transcript takes the teacher's second choice at one drawn word and goes on as the teacher decodes after it, "
        "so that the student learns the teacher's recovery from a wrong word, not only its greedy path",
        bounds=Bounds.reals(0, 1),
    )
    branch_first_share: float = opt(
        0.0,
        "with --branch-share: the share of the branched windows that take the second choice at their first word (the "
        "rest at a word drawn anywhere in the text): a wrong first word has no text before it to steer what follows",
        bounds=Bounds.reals(0, 1),
    )
    max_window_seconds: float = opt(
        30.0,
        "with --windows every-length: the longest window (up to 60 s); above 30 s the student's encoder must add no "
        "absolute table, a window over 30 s is split at a pause for the teacher, which transcribes each half, and "
        "its loss is cross-entropy on the two transcripts joined (no distillation terms: the teacher never reads the "
        "whole window)",
        bounds=Bounds.reals(1, 60),
    )
    pad_to_30s: bool = opt(
        False, "give rotary-only encoders 30-s padded input too (encoders with an absolute table always get it)"
    )
    packed_attention: bool = opt(
        False,
        "encode unpadded batches packed: clips end to end with block-diagonal attention instead of padding and a "
        "mask (same results; fused variable-length attention on GPUs, see benchmarks/README.md)",
    )
    num_workers: int = opt(2, "DataLoader processes decoding audio (0: in the main process)", bounds=WORKERS)
    strict: bool = opt(False, "stop at the first unusable manifest row instead of skipping and listing it")
    seed: int = opt(0, "seed of the batch order, SpecAugment and initialisation", bounds=SEED)

    # Self-distillation.
    ce_weight: float = opt(
        1.0,
        "weight of the token cross-entropy against the targets (0: learn from the teacher alone)",
        bounds=LOSS_WEIGHT,
    )
    distill: bool = opt(
        False,
        "add KL(teacher || student) on token distributions; the teacher is --model loaded as the upstream "
        "whisper variant, frozen, fed 30-s padded input",
    )
    distill_only: bool = opt(
        False, "train on untranscribed audio: the teacher's greedy transcript is the target (implies --distill)"
    )
    distill_weight: float = opt(1.0, "weight of the distillation KL term", bounds=LOSS_WEIGHT)
    distill_temperature: float = opt(2.0, "softmax temperature of the distillation KL", bounds=Bounds.reals(0.01, 100))
    distill_encoder_weight: float = opt(
        0.0,
        "weight of the mean squared error between the student's and the teacher's encoder outputs on each clip's "
        "own positions (the teacher fed the 30-s window)",
        bounds=LOSS_WEIGHT,
    )
    distill_decoder_layers: float = opt(
        0.0,
        "weight of the mean squared error between student and teacher hidden states of every decoder layer, on "
        "the teacher-forced tokens",
        bounds=LOSS_WEIGHT,
    )
    distill_encoder_layers: float = opt(
        0.0,
        "weight of the mean squared error of every encoder layer's output on each clip's positions",
        bounds=LOSS_WEIGHT,
    )
    distill_attention: float = opt(
        0.0, "weight of the mean squared error of every self-attention output", bounds=LOSS_WEIGHT
    )
    teacher_cache: Optional[PathText] = opt(
        None,
        "directory of the teacher's cached targets, computed once per clip and teacher "
        "(default: whisper_rope's cache directory, teacher-targets/)",
    )

    # Positional transplant.
    transplant: bool = opt(
        False,
        "move the checkpoint to --variant (rotary/rotary, or rotary/learned for the encoder alone) continuously: "
        "train the gated hybrid (rotary+sinusoidal encoder, and rotary+learned decoder if it turns rotary), "
        "identical to the checkpoint at the start, fade the absolute tables out while the RoPE gates open; the "
        "finished run is saved as plain --variant",
    )
    transplant_anneal_start: int = opt(0, "step at which the absolute tables start to fade", bounds=STEPS)
    transplant_anneal_steps: Optional[int] = opt(
        None, "steps over which the tables fade from 1 to 0 (default: half of --steps)", bounds=STEPS
    )
    transplant_shape: str = opt("cosine", "shape of the fade and gate ramps", choices=("linear", "cosine"))
    transplant_sides: str = opt(
        "both", "which tables fade (encoder or decoder alone leaves a hybrid)", choices=("both", "encoder", "decoder")
    )
    transplant_gate_start: Optional[int] = opt(
        None, "step at which scheduled gates start to open (default: when the tables start to fade)", bounds=STEPS
    )
    transplant_gates: str = opt(
        "scheduled",
        "scheduled: every gate is driven from 0 to 1 while the tables fade (or over --transplant-gate-steps); "
        "learned: the gates train freely (a run whose gates stay near 0 keeps no position information)",
        choices=("scheduled", "learned"),
    )
    transplant_gate_steps: Optional[int] = opt(
        None, "steps over which scheduled gates open (default: the fade's steps)", bounds=STEPS
    )
    transplant_unpadded: bool = opt(
        False,
        "once the tables have faded to 0, train the rest of the run on unpadded input (each clip's own frames, "
        "length-bucketed batches), so that the result transcribes unpadded (see --unpadded of transcribe)",
    )

    # Bookkeeping.
    eval_holdout: Optional[int] = opt(
        0,
        "without --eval: keep this many clips of --train (clips whose audio decodes) out of training and evaluate on "
        "them against the teacher's 30-s transcripts (label-free evaluation; 0 %% WER = the source model's words); "
        "a recipe's default is a fifth of the clips, at most 24",
        bounds=STEPS,
    )
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)", bounds=STEPS)
    eval_at_start: bool = opt(False, "also evaluate before the first step (a baseline)")
    save_every: int = opt(
        0,
        "write a step checkpoint (step-N/: the model and the training state that --resume continues from) every N "
        "steps and at the last step (0: none; the run writes only model.pt and best/)",
        bounds=STEPS,
    )
    save_dtype: str = opt(
        "float16",
        "dtype of the weights in the model files (model.pt, best/, step-N/); float16 (like upstream's files) halves "
        "them, and a step checkpoint's training state keeps in float32 what float16 rounds, so --resume stays exact "
        "(validation during the run scores the float32 weights)",
        choices=("float16", "float32"),
    )
    keep_last: int = opt(2, "step checkpoints to keep (the best-WER model is kept apart)", bounds=AT_LEAST_ONE_STEP)
    log_every: int = opt(10, "log training metrics every N steps", bounds=AT_LEAST_ONE_STEP)
    resume: Optional[PathText] = opt(
        None,
        "continue exactly from a checkpoint: a step-N directory, or an output directory (its latest); without a "
        "value, --output's latest; changed --lr/--weight-decay apply from there and are recorded",
        nargs="?",
        const="",
    )
    device: Optional[str] = opt(None, f"{DEVICE_HELP}; under torchrun each rank uses cuda:LOCAL_RANK")
    threads: int = opt(0, THREADS_HELP, bounds=THREADS)
    progress: bool = opt(True, "show a progress bar")

    def validate(self) -> "FinetuneConfig":
        """Raise ValueError naming the first invalid setting."""
        check_bounds(self)
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)
        check_device(self.device)
        for policy, flag in ((self.train_policy, "--train-policy"), (self.stage_policy, "--stage-policy")):
            check_policy(policy, flag)
        if self.transplant:
            transplant_start_variant(self.variant or "rotary")
        self._check_combinations()
        return self

    def _checks(self):
        """The settings no declared range covers (numbers are checked by `check_bounds`)."""
        return [
            (self.schedule in ("cosine", "linear"), f"--schedule must be cosine or linear, got {self.schedule!r}"),
            (
                self.precision in ("auto", "fp32", "bf16", "fp16"),
                f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}",
            ),
            (self.task in ("transcribe", "translate"), f"--task must be transcribe or translate, got {self.task!r}"),
            (
                self.windows in ("clips", "every-length"),
                f"--windows must be clips or every-length, got {self.windows!r}",
            ),
            (bool(self.output), "--output must name a directory"),
        ]

    def _check_combinations(self) -> None:
        if self.transplant_unpadded and not (self.transplant and self.transplant_sides in ("both", "encoder")):
            raise ValueError(
                "--transplant-unpadded needs --transplant with the encoder's table fading (--transplant-sides both or "
                "encoder): the input can only be unpadded once that table is gone"
            )
        if self.transplant_unpadded and self.unpadded:
            raise ValueError(
                "--transplant-unpadded switches to unpadded input mid-run; with --unpadded it is so from "
                "the start: give one of them"
            )
        if self.pad_to_30s and (self.transplant_unpadded or self.unpadded):
            raise ValueError("--pad-to-30s contradicts --unpadded and --transplant-unpadded")
        if self.max_window_seconds > 30:
            self._check_long_windows()
        if self.ce_weight == 0 and not self.uses_teacher:
            raise ValueError(
                "--ce-weight 0 without a distillation term leaves nothing to learn: give --distill or "
                "a --distill-... weight"
            )

    def _check_long_windows(self) -> None:
        """Windows over 30 s need every-length windows, unpadded input and a student whose encoder adds no table."""
        flag = f"--max-window-seconds {self.max_window_seconds:g}"
        if self.windows != "every-length":
            raise ValueError(f"{flag} needs --windows every-length: only composed windows pass 30 s")
        if self.transplant or self.pad_to_30s or self.unpadded is False:
            raise ValueError(
                f"{flag} needs a student whose encoder adds no absolute table, fed unpadded: not --transplant, "
                "--pad-to-30s or --no-unpadded (a table positions one 30-s window at most)"
            )
        if self.variant is not None and parse_variant(self.variant).encoder.table is not None:
            raise ValueError(
                f"{flag} needs a student whose encoder adds no absolute table; --variant {self.variant} adds one, "
                "which positions one 30-s window at most"
            )

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "FinetuneConfig":
        """A config with recipe ``name``'s values (`recipes.RECIPES`, step counts scaled to ``steps`` when it is
        overridden), ``overrides`` winning; not yet validated."""
        return cls(**{**recipe_defaults(name, overrides.get("steps")), **overrides})

    @property
    def uses_teacher(self) -> bool:
        """Whether the run needs the frozen teacher (its transcripts, distribution or states)."""
        states = (
            self.distill_encoder_weight,
            self.distill_decoder_layers,
            self.distill_encoder_layers,
            self.distill_attention,
        )
        return self.distill or self.distill_only or any(weight > 0 for weight in states)

    @property
    def effective_warmup(self) -> int:
        """--warmup-steps, or a tenth of --steps (at most 50) when it is not given."""
        return self.warmup_steps if self.warmup_steps is not None else min(50, self.steps // 10)

    def _warmup_warning(self) -> str:
        """What a warm-up longer than half the run does to the learning rate, and the longest one that does not."""
        warmup, steps = self.warmup_steps, self.steps
        if warmup > steps:
            effect = f"the learning rate reaches only {100 * steps / warmup:.0f} % of --lr {self.lr:g} and never decays"
        elif warmup == steps:
            effect = "the learning rate rises for the whole run and never decays"
        else:
            effect = f"the learning rate rises for {warmup} of the {steps} steps and decays for only {steps - warmup}"
        advice = f"give --warmup-steps at most {steps // 2} (half of --steps)"
        return f"--warmup-steps {warmup} with --steps {steps}: {effect}; {advice}"

    def self_defeating(self) -> list:
        """Warnings for settings that defeat their own purpose (the run still starts)."""
        messages = []
        if self.warmup_steps is not None and self.warmup_steps * 2 > self.steps:
            messages.append(self._warmup_warning())
        if self.stage_steps >= self.steps:
            messages.append(
                f"--stage-steps {self.stage_steps} covers the whole run of {self.steps} steps: only "
                f"--stage-policy {self.stage_policy} ever trains"
            )
        if self.transplant and self.transplant_gates == "learned":
            messages.append(
                "--transplant-gates learned: nothing makes the gates open while the tables fade; a run "
                "whose gates stay near 0 ends with no position information"
            )
        return messages
