"""``python -m whisper_rope.training``: the ``whisper-rope finetune`` command on its own (also under torchrun)."""

import sys

from ..cli.finetune import main

sys.exit(main())
