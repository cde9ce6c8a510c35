"""The command line: ``whisper-rope`` (`main`, the ``whisper-rope`` entry point) and its subcommands.

* `main` - the parser of ``whisper-rope`` (one subparser per subcommand, `main.COMMANDS`) and `main` itself.
* `transcribe`, `convert`, `variants`, `finetune`, `evaluate`, `compare` - one module per subcommand: its options
  (`TranscribeOptions`, `ConvertOptions`, `EvaluateCommand`; the others' are the library's) and its run
  (``python -m whisper_rope.training`` and ``python -m whisper_rope.evaluation`` run `finetune` and `evaluate` on
  their own).
* `arguments` - the argparse bridge: one option per field of a job's dataclass.
* `runtime` - how every command runs: one-line errors and warnings, exit statuses, Ctrl-C.

The library imports nothing from here (tests/test_import.py).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
