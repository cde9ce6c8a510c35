"""Training: fine-tuning a checkpoint into a positional variant.

* `config` - `FinetuneConfig`, every setting of a run (the ``whisper-rope finetune`` options are built from it).
* `recipes` - named sets of `FinetuneConfig` defaults for one goal (``--recipe``).
* `loop` - `finetune`: the training loop, read top to bottom as small steps on one `RunState`.
* `pipeline` - the datasets, the teacher's cached targets and the batches the loop feeds the model.
* `objective` - the loss of one micro-batch (cross-entropy, KL to the teacher, internal-state terms).
* `losses` - the distillation losses on internal states (decoder and encoder hidden states, attention outputs).
* `teacher_cache` - the frozen teacher's targets, computed once per clip and kept on disk.
* `optim` - which parameters train, at which learning rate, on which schedule, in which precision.
* `holdout` - label-free evaluation on held-out clips against the teacher's transcripts.
* `state` - step directories and the training state that ``--resume`` continues exactly from.
* `log` - ``train_log.jsonl`` and the training curves.
* `distributed` - the DistributedDataParallel context under ``torchrun``.
* `transplant` - the positional transplant schedule (gated RoPE in, absolute tables out).

The ``whisper-rope finetune`` command is `whisper_rope.cli.finetune` (``python -m whisper_rope.training`` runs it);
a recipe run's final evaluation table is `whisper_rope.experiments.report`.
"""
