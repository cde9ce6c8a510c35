"""``python -m whisper_rope.evaluation``: the ``whisper-rope evaluate`` command on its own."""

import sys

from ..cli.evaluate import main

sys.exit(main())
