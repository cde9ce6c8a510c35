"""``import whisper_rope`` is the library alone: it loads no command-line module and works where ``fcntl`` does not
exist (Windows), so that ``load_model`` can be imported there (docs/design.md, "Layout")."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The command line: the package ``whisper_rope.cli`` (its entry point, the argparse bridge, the runtime, one module
#: per subcommand). The library imports none of its modules.
CLI_PACKAGE = "whisper_rope.cli"
#: Some of its modules, so that a move away from the package is noticed (`test_the_command_line_package_exists`).
CLI_MODULES = {
    "whisper_rope.cli.main",
    "whisper_rope.cli.runtime",
    "whisper_rope.cli.arguments",
    "whisper_rope.cli.evaluate",
    "whisper_rope.cli.compare",
    "whisper_rope.cli.finetune",
}


def _command_line(modules) -> set:
    """The modules of ``modules`` that belong to the command line."""
    return {name for name in modules if name == CLI_PACKAGE or name.startswith(CLI_PACKAGE + ".")}


def _run_module(*arguments: str) -> subprocess.CompletedProcess:
    """A fresh interpreter run with ``arguments``, this checkout's package first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=env, timeout=120)


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this checkout's package first on the path."""
    return _run_module("-c", code)


def test_importing_the_package_imports_no_command_line_module():
    done = _run("import json, sys, whisper_rope; print(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "whisper_rope.weights.loading" in loaded  # the check sees the package's modules
    assert not _command_line(loaded), sorted(_command_line(loaded))


def test_the_command_line_package_exists():
    """A package renamed away from `CLI_PACKAGE` would make the test above pass without checking it."""
    assert (REPO / CLI_PACKAGE.replace(".", "/") / "__init__.py").is_file()
    for name in CLI_MODULES:
        assert (REPO / (name.replace(".", "/") + ".py")).is_file(), name
    assert _command_line(CLI_MODULES) == CLI_MODULES


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


#: What the README names under ``whisper_rope.`` that is a module, not an API name: the command line's module
#: (``torchrun -m whisper_rope.cli``), the subpackage of the foreign-format readers, and ``__all__`` itself.
README_MODULES = {"cli", "weights", "__all__"}


def test_every_name_the_readme_teaches_is_in_the_public_api():
    import whisper_rope

    taught = set(re.findall(r"whisper_rope\.([A-Za-z_]\w*)", (REPO / "README.md").read_text(encoding="utf-8")))
    assert {"load_model", "finetune", "transcribe_many"} <= taught  # the README's examples are read
    missing = taught - README_MODULES - set(whisper_rope.__all__)
    assert not missing, sorted(missing)
    assert all(hasattr(whisper_rope, name) for name in whisper_rope.__all__)
    assert callable(whisper_rope.evaluate) and callable(whisper_rope.finetune)


STANDALONE = [("whisper_rope.training", "finetune"), ("whisper_rope.evaluation", "evaluate")]


@pytest.mark.parametrize("module, command", STANDALONE)
def test_the_standalone_commands_are_the_subcommands(module, command):
    """``python -m whisper_rope.training`` is ``whisper-rope finetune``: same usage, description and options."""
    alone = _run_module("-W", "error::RuntimeWarning", "-m", module, "--help")
    assert alone.returncode == 0, alone.stderr
    subcommand = _run_module("-m", "whisper_rope.cli", command, "--help")
    assert subcommand.returncode == 0, subcommand.stderr
    assert alone.stdout.startswith(f"usage: whisper-rope {command} ")
    assert alone.stdout == subcommand.stdout
