"""`FinetuneConfig`: every setting of a fine-tuning run, the one declaration that the Python API and the
``whisper-rope finetune`` options (`whisper_rope.options`) are both built from."""

import re
from dataclasses import dataclass, field
from typing import Optional

from ..options import option
from ..variants import parse_variant

#: What ``--train-policy`` accepts besides a regular expression over parameter names.
POLICIES = ("all", "positional", "decoder", "encoder")

#: Settings that do not change the training trajectory: a resumed run may differ in these.
BOOKKEEPING = {
    "output",
    "resume",
    "steps",
    "progress",
    "save_every",
    "keep_last",
    "log_every",
    "eval_every",
    "eval_at_start",
    "eval",
    "num_workers",
    "threads",
    "device",
    "strict",
}


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; the ``whisper-rope finetune`` options are built from these fields."""

    # What to train.
    model: str = field(
        default="tiny.en",
        metadata=option(
            "pretrained or fine-tuned weights: a model name (tiny.en ... large-v3-turbo), a .pt checkpoint, or a "
            "faster-whisper / Hugging Face directory; also the distillation teacher"
        ),
    )
    variant: Optional[str] = field(
        default=None,
        metadata=option(
            "positional variant to train (a preset such as rotary, or ENCODER/DECODER); default: the checkpoint's own"
        ),
    )
    rotary_theta: Optional[float] = field(
        default=None, metadata=option("RoPE base; default: the checkpoint's (10000 for new rotary variants)")
    )
    gated_rotary: Optional[bool] = field(
        default=None,
        metadata=option("learn a per-head gate (initialised to 0) that mixes RoPE in; default: the checkpoint's"),
    )
    train: Optional[str] = field(
        default=None,
        metadata=option(
            "training manifest (.jsonl/.csv/.tsv with audio,text[,language,start,end,prompt]) or a directory of audio "
            "files with same-named .txt transcripts"
        ),
    )
    eval: Optional[str] = field(
        default=None,
        metadata=option(
            "evaluation manifest: validation loss and greedy WER/CER every --eval-every steps and at the end"
        ),
    )
    output: str = field(
        default="finetune-output", metadata=option("output directory: checkpoints, logs, curves", flags=("-o",))
    )
    language: Optional[str] = field(
        default=None, metadata=option("language of rows that name none (multilingual models; default en)")
    )
    task: str = field(
        default="transcribe", metadata=option("task token of multilingual models", choices=("transcribe", "translate"))
    )

    # Optimisation.
    steps: int = field(default=1000, metadata=option("optimizer steps to train for (in total, when resuming)"))
    batch_size: int = field(
        default=8, metadata=option("clips per forward pass over all processes (a multiple of the number of processes)")
    )
    grad_accum: int = field(
        default=1,
        metadata=option("forward passes accumulated per optimizer step (clips per step: batch_size * grad_accum)"),
    )
    lr: float = field(default=1e-5, metadata=option("peak learning rate (AdamW)"))
    warmup_steps: int = field(default=50, metadata=option("steps of linear learning-rate warm-up from zero"))
    schedule: str = field(
        default="cosine",
        metadata=option("learning-rate decay after warm-up, to zero at --steps", choices=("cosine", "linear")),
    )
    weight_decay: float = field(
        default=0.01,
        metadata=option("AdamW weight decay, applied to matrices only (biases, norms and gates are not decayed)"),
    )
    grad_clip: float = field(default=1.0, metadata=option("clip the gradient norm to this (0: no clipping)"))
    label_smoothing: float = field(default=0.0, metadata=option("label smoothing of the token cross-entropy"))
    train_policy: str = field(
        default="all",
        metadata=option(
            "which parameters train: all, positional (positional parameters and attention), decoder, encoder, or a "
            "regular expression searched in parameter names; newly initialised parameters (rotary gates, "
            "re-initialised tables) always train"
        ),
    )
    precision: str = field(
        default="auto",
        metadata=option(
            "auto: bf16 autocast on CUDA where supported, else fp16 with a gradient scaler; fp32 on the CPU",
            choices=("auto", "fp32", "bf16", "fp16"),
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=option("recompute each residual block in the backward pass (less memory, about a third more compute)"),
    )
    spec_augment: bool = field(
        default=False,
        metadata=option(
            "SpecAugment: mask 2 frequency bands (up to 27 mel bins) and 2 time spans (up to 40 frames, 10%% of the "
            "clip)"
        ),
    )

    # Data.
    pad_to_30s: bool = field(
        default=False,
        metadata=option(
            "give rotary-only encoders 30-s padded input too (encoders with an absolute table always get it)"
        ),
    )
    num_workers: int = field(default=2, metadata=option("DataLoader processes decoding audio (0: in the main process)"))
    strict: bool = field(
        default=False, metadata=option("stop at the first unusable manifest row instead of skipping and listing it")
    )
    seed: int = field(default=0, metadata=option("seed of the batch order, SpecAugment and initialisation"))

    # Self-distillation.
    distill: bool = field(
        default=False,
        metadata=option(
            "add KL(teacher || student) on token distributions; the teacher is --model loaded as the upstream "
            "whisper variant, frozen, fed 30-s padded input"
        ),
    )
    distill_only: bool = field(
        default=False,
        metadata=option(
            "train on untranscribed audio: the teacher's greedy transcript is the target (implies --distill)"
        ),
    )
    distill_weight: float = field(default=1.0, metadata=option("weight of the distillation KL term"))
    distill_temperature: float = field(default=2.0, metadata=option("softmax temperature of the distillation KL"))
    distill_encoder_weight: float = field(
        default=0.0,
        metadata=option(
            "weight of an L2 loss between student and teacher encoder outputs (only when their lengths match)"
        ),
    )

    # Positional transplant.
    transplant: bool = field(
        default=False,
        metadata=option(
            "move the checkpoint to rotary embeddings continuously: train the gated hybrid "
            "rotary+sinusoidal/rotary+learned (identical to the checkpoint at the start), fade the absolute tables "
            "out, open the RoPE gates; a run that ends with the tables at 0 and every gate at 1 is saved as plain "
            "rotary/rotary"
        ),
    )
    transplant_anneal_start: int = field(default=0, metadata=option("step at which the absolute tables start to fade"))
    transplant_anneal_steps: Optional[int] = field(
        default=None, metadata=option("steps over which the tables fade from 1 to 0 (default: half of --steps)")
    )
    transplant_shape: str = field(
        default="cosine", metadata=option("shape of the fade and gate ramps", choices=("linear", "cosine"))
    )
    transplant_sides: str = field(
        default="both",
        metadata=option(
            "which tables fade (encoder or decoder alone leaves a hybrid)", choices=("both", "encoder", "decoder")
        ),
    )
    transplant_gate_start: int = field(default=0, metadata=option("step at which scheduled gates start to open"))
    transplant_gate_steps: Optional[int] = field(
        default=None, metadata=option("drive every gate from 0 to 1 over this many steps instead of learning the gates")
    )
    transplant_unpadded: bool = field(
        default=False,
        metadata=option(
            "once the tables have faded to 0, train the rest of the run on unpadded input (each clip's own frames, "
            "length-bucketed batches), so that the result transcribes unpadded (see --unpadded of transcribe)"
        ),
    )

    # Bookkeeping.
    eval_every: int = field(default=0, metadata=option("evaluate every N steps (0: only at the end)"))
    eval_at_start: bool = field(default=False, metadata=option("also evaluate before the first step (a baseline)"))
    save_every: int = field(default=0, metadata=option("write a checkpoint every N steps (0: only at the end)"))
    keep_last: int = field(default=2, metadata=option("step checkpoints to keep (the best-WER model is kept apart)"))
    log_every: int = field(default=10, metadata=option("log training metrics every N steps"))
    resume: Optional[str] = field(
        default=None,
        metadata=option(
            "continue exactly from a checkpoint: a step-N directory, or an output directory (its latest); without a "
            "value, --output's latest",
            nargs="?",
            const="",
        ),
    )
    device: Optional[str] = field(
        default=None,
        metadata=option("cpu or cuda (default: cuda when available; under torchrun each rank uses cuda:LOCAL_RANK)"),
    )
    threads: int = field(default=0, metadata=option("torch CPU threads (0 keeps torch's default)"))
    progress: bool = field(default=True, metadata=option("show a progress bar"))

    def validate(self) -> "FinetuneConfig":
        """Raise ValueError naming the first invalid setting."""
        checks = [
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.warmup_steps >= 0, f"--warmup-steps must not be negative, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"--weight-decay must not be negative, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"--grad-clip must not be negative, got {self.grad_clip}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.schedule in ("cosine", "linear"), f"--schedule must be cosine or linear, got {self.schedule!r}"),
            (
                self.precision in ("auto", "fp32", "bf16", "fp16"),
                f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}",
            ),
            (self.task in ("transcribe", "translate"), f"--task must be transcribe or translate, got {self.task!r}"),
            (self.distill_temperature > 0, f"--distill-temperature must be positive, got {self.distill_temperature}"),
            (self.distill_weight >= 0, f"--distill-weight must not be negative, got {self.distill_weight}"),
            (
                self.distill_encoder_weight >= 0,
                f"--distill-encoder-weight must not be negative, got {self.distill_encoder_weight}",
            ),
            (self.num_workers >= 0, f"--num-workers must not be negative, got {self.num_workers}"),
            (self.eval_every >= 0, f"--eval-every must not be negative, got {self.eval_every}"),
            (self.save_every >= 0, f"--save-every must not be negative, got {self.save_every}"),
            (self.keep_last >= 1, f"--keep-last must be at least 1, got {self.keep_last}"),
            (self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}"),
            (bool(self.output), "--output must name a directory"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.transplant and parse_variant(self.variant or "rotary").name != "rotary/rotary":
            raise ValueError(f"--transplant ends in the rotary variant; --variant {self.variant!r} is another one")
        if self.transplant_unpadded and not (self.transplant and self.transplant_sides == "both"):
            raise ValueError(
                "--transplant-unpadded needs --transplant with --transplant-sides both (the encoder's "
                "table must fade out before the input can be unpadded)"
            )
        if self.transplant_unpadded and self.pad_to_30s:
            raise ValueError("--transplant-unpadded and --pad-to-30s contradict each other")
        if self.train_policy not in POLICIES:
            try:
                re.compile(self.train_policy)
            except re.error as error:
                raise ValueError(
                    f"--train-policy {self.train_policy!r} is neither one of {', '.join(POLICIES)} nor a valid "
                    f"regular expression ({error})"
                ) from None
        return self
