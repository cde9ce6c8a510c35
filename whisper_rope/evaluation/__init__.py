"""Evaluation: scoring a model on transcribed clips.

* `evaluate` - `evaluate(model, data)`: WER/CER with their edits and the real-time factor.
* `metrics` - text normalisation and word/character error counts.

The ``whisper-rope evaluate`` command is `whisper_rope.cli.evaluate` (``python -m whisper_rope.evaluation`` runs
it); comparing variants side by side is `whisper_rope.experiments.compare`.

The function ``whisper_rope.evaluate`` is `evaluate.evaluate`; this package does not re-export it, so that
``whisper_rope.evaluation.evaluate`` always names the module.
"""
