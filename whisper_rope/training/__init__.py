"""Training: fine-tuning a checkpoint into a positional variant.

* `config` - `FinetuneConfig`, every setting of a run (the ``whisper-rope finetune`` options are built from it).
* `loop` - `finetune`: the training loop, validation, distillation.
* `command` - the ``whisper-rope finetune`` command (``python -m whisper_rope.train``).
* `state` - step directories and the training state that ``--resume`` continues exactly from.
* `log` - ``train_log.jsonl`` and the training curves.
* `distributed` - the DistributedDataParallel context under ``torchrun``.
* `transplant` - the positional transplant schedule (gated RoPE in, absolute tables out).
"""
