"""``python -m whisper_rope.evaluation``: the ``whisper-rope evaluate`` command on its own."""

import sys

from .command import main

sys.exit(main())
