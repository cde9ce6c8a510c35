"""``python -m whisper_rope.cli``: the ``whisper-rope`` command."""

import sys

from .main import main

sys.exit(main())
