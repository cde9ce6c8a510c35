"""Evaluation: scoring a model on transcribed clips, and comparing variants.

* `evaluate` - `evaluate(model, data)`: WER/CER with their edits and the real-time factor.
* `metrics` - text normalisation and word/character error counts.
* `compare` - fine-tune and evaluate several variants side by side.
* `command` and `compare_command` - the ``whisper-rope evaluate`` and ``whisper-rope compare`` commands (the command
  line's layer: nothing else here imports them); ``python -m whisper_rope.evaluation`` runs the first.

The function ``whisper_rope.evaluate`` is `evaluate.evaluate`; this package does not re-export it, so that
``whisper_rope.evaluation.evaluate`` always names the module.
"""
