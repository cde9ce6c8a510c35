"""``import whisper_rope`` is the library alone: it loads no command-line module and works where ``fcntl`` does not
exist (Windows), so that ``load_model`` can be imported there (docs/design.md, "Layout")."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The command line: the argparse bridge, the subcommands and their runners. The library imports none of them.
CLI_MODULES = {
    "whisper_rope.cli",
    "whisper_rope.options",
    "whisper_rope.evaluation.command",
    "whisper_rope.evaluation.compare",
    "whisper_rope.training.command",
}


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this checkout's package first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_importing_the_package_imports_no_command_line_module():
    done = _run("import json, sys, whisper_rope; print(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "whisper_rope.weights.loading" in loaded  # the check sees the package's modules
    assert not loaded & CLI_MODULES, sorted(loaded & CLI_MODULES)


def test_the_command_line_modules_named_above_exist():
    """A module renamed away from this list would make the test above pass without checking it."""
    for name in CLI_MODULES:
        assert (REPO / (name.replace(".", "/") + ".py")).is_file(), name


def test_load_model_is_importable_and_runs_where_fcntl_does_not_exist(tmp_path):
    """``fcntl`` hidden (importing it raises ImportError, as on Windows): the package imports, and a model built,
    saved and loaded back gives the same weights."""
    code = f"""
import sys
sys.modules["fcntl"] = None
import torch
from whisper.model import ModelDimensions
from whisper_rope import build_model, load_model, save_checkpoint
dims = ModelDimensions(n_mels=80, n_audio_ctx=8, n_audio_state=16, n_audio_head=2, n_audio_layer=1, n_vocab=51864,
                       n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1)
model = build_model(dims, "rotary/rotary")
save_checkpoint(model, {str(tmp_path / "m.pt")!r})
loaded = load_model({str(tmp_path / "m.pt")!r}, device="cpu")
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
print("fcntl" in sys.modules and sys.modules["fcntl"] is None, same, loaded.variant)
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "rotary/rotary"]
