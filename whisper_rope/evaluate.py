"""Kept for one release so that old imports and ``python -m whisper_rope.evaluate`` keep working: evaluation moved
to `whisper_rope.evaluation.evaluate`.

``whisper_rope.evaluate`` is also the public function ``evaluate(model, data)``. Importing this module rebinds that
attribute of the package to the module, so the module is made callable: ``whisper_rope.evaluate(model, data)``
works whichever of the two the name holds.
"""

import sys
import types

from whisper_rope.evaluation.command import main
from whisper_rope.evaluation.evaluate import *  # noqa: F403
from whisper_rope.evaluation.evaluate import evaluate


class _CallableModule(types.ModuleType):
    """This module, callable as the function `whisper_rope.evaluation.evaluate.evaluate`."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
