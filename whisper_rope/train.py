"""Kept for one release so that old imports and ``python -m whisper_rope.train`` keep working: fine-tuning moved
to `whisper_rope.training` (`whisper_rope.training.loop`, `whisper_rope.training.config`,
`whisper_rope.training.command`, `whisper_rope.training.optim`, `whisper_rope.training.state`)."""

import sys

from whisper_rope.training.command import *  # noqa: F403
from whisper_rope.training.command import main
from whisper_rope.training.config import *  # noqa: F403
from whisper_rope.training.loop import *  # noqa: F403
from whisper_rope.training.optim import *  # noqa: F403
from whisper_rope.training.state import *  # noqa: F403

if __name__ == "__main__":
    sys.exit(main())
