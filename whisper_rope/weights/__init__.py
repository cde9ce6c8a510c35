"""Weights: reading, validating, adapting, converting and saving checkpoints.

Modules, from the bottom up (each imports only those above it in this list):

* `format` - read and validate a ``.pt`` file (``weights_only`` loading, refused pickles, dims, tensor shapes).
* `common` - `ImportedCheckpoint` and helpers shared by the importers and exporters.
* `ctranslate2`, `huggingface` - faster-whisper's ``model.bin`` and Hugging Face directories, in upstream names.
* `packages` - models shipped inside installed Python packages, converted once into a cache.
* `loading` - `load_model`, `build_model`, `save_checkpoint`: name resolution, adaptation to a variant, our format.
* `convert` - `convert`: between those formats (the ``whisper-rope convert`` command is `whisper_rope.cli.convert`).
"""
