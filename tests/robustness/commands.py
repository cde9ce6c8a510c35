"""Helpers for the robustness tests: the ``whisper-rope`` command run as a user runs it, tiny checkpoints, file-tree
fingerprints and the peak memory of a child process.

Everything here goes through public behaviour only (the console script, ``whisper_rope.build_model``,
``save_checkpoint``, ``load_model``), so that the tests survive moves inside the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from . import REPO, SPEECH, subprocess_env

#: The console script installed beside this interpreter (a clean clone installs it with ``pip install .``).
WHISPER_ROPE = Path(sys.executable).with_name("whisper-rope")
MANIFEST = SPEECH / "manifest.jsonl"
HELLO = REPO / "tests" / "fixtures" / "hello.flac"

#: Dims of a checkpoint that loads in milliseconds (a vocabulary too small for the tokenizer: load-only tests).
TOY_DIMS = {"n_mels": 8, "n_audio_ctx": 12, "n_audio_state": 16, "n_audio_head": 2, "n_audio_layer": 2,
            "n_vocab": 100, "n_text_ctx": 10, "n_text_state": 16, "n_text_head": 2, "n_text_layer": 2}  # fmt: skip
#: Dims of a random model that transcribes and fine-tunes (the English vocabulary, 30-s windows), 14 MB on disk.
SPEECH_DIMS = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 4, "n_audio_layer": 2,
               "n_vocab": 51864, "n_text_ctx": 32, "n_text_state": 64, "n_text_head": 4, "n_text_layer": 2}  # fmt: skip


def command(
    *args,
    cwd: Optional[Path] = None,
    home: Optional[Path] = None,
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """``whisper-rope ARGS`` in a child process (text stdout/stderr), from ``cwd``, with ``HOME`` set to ``home``.

    The cache stays where the parent's is (``WHISPER_ROPE_CACHE``), so that a new HOME does not convert tiny.en
    again.
    """
    assert WHISPER_ROPE.is_file(), f"the whisper-rope console script is not installed beside {sys.executable}"
    environment = {**subprocess_env(), **(env or {})}
    if home is not None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        environment.setdefault("WHISPER_ROPE_CACHE", os.path.join(cache, "whisper_rope"))
        environment["HOME"] = str(home)
    return subprocess.run([str(WHISPER_ROPE), *map(str, args)], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def one_error_line(stderr: str, *fragments: str) -> str:
    """The only line of ``stderr`` that is not a log line (``whisper_rope: ...``) or a progress bar: one
    ``whisper-rope: error: ...`` line holding every fragment."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("whisper-rope: error: ")]
    assert len(errors) == 1, f"expected one error line, got:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def save_model(path: Path, variant: str = "whisper", dims: Optional[dict] = None, seed: int = 0) -> Path:
    """A random checkpoint of ``variant`` (our format) at ``path``."""
    import whisper_rope

    torch.manual_seed(seed)
    model = whisper_rope.build_model(dict(dims or TOY_DIMS), variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    return whisper_rope.save_checkpoint(model, path)


def checkpoint(path: Path) -> dict:
    """The dict a checkpoint file holds (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def fingerprint(root: Path) -> Dict[str, str]:
    """Every entry under ``root`` (hidden ones too) -> its content hash ("dir" for directories), to show that a
    command left a tree exactly as it was."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


PEAK_SCRIPT = """
import json, resource, sys, traceback
def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import torch, whisper_rope
import whisper_rope.cli
cap = int(sys.argv[1])
if cap:
    with open("/proc/self/status") as status:
        size = next(int(l.split()[1]) for l in status if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + cap, resource.RLIM_INFINITY))
baseline = peak_kib()
outcome = {"baseline_kib": baseline}
try:
{body}
    outcome["result"] = "ok"
except whisper_rope.WhisperRopeError as error:
    outcome.update(result="refused", type=type(error).__name__, message=str(error))
except SystemExit as error:
    outcome.update(result="exit", code=error.code)
except BaseException as error:
    outcome.update(result="crashed", type=type(error).__name__, message=str(error)[:300],
                   where=traceback.format_exc()[-1500:])
outcome["peak_kib"] = peak_kib()
print("PEAK " + json.dumps(outcome), flush=True)
"""


def peak_memory(body: str, cap_bytes: int = 3 << 30, timeout: float = 120) -> dict:
    """Run ``body`` (Python, with ``torch`` and ``whisper_rope`` imported) in a child whose address space is capped
    at ``cap_bytes`` above its size after the imports; returns its outcome and ``growth`` = peak RSS minus the peak
    before ``body`` (bytes), measured by ``resource.getrusage``."""
    script = PEAK_SCRIPT.replace("{body}", textwrap.indent(textwrap.dedent(body).strip(), "    "))
    done = subprocess.run([sys.executable, "-c", script, str(cap_bytes)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    assert lines, f"child died (status {done.returncode}):\n{done.stderr[-3000:]}"
    outcome = json.loads(lines[-1][5:])
    outcome["growth"] = (outcome["peak_kib"] - outcome["baseline_kib"]) * 1024
    return outcome


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def write_manifest(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class _Captured(Exception):
    """Raised in place of parsing, once an entry point's parser is captured."""


def entry_point_parsers() -> Dict[str, argparse.ArgumentParser]:
    """Every parser a user reaches, as the entry points build them: ``whisper-rope`` and each of its subcommands
    (``whisper-rope transcribe`` ...), ``python -m whisper_rope.training`` and ``python -m whisper_rope.evaluation``,
    keyed by the command line that reaches it. Captured when each ``main`` starts to parse, so that a parser built
    another way is still found."""
    from unittest import mock

    from whisper_rope import cli
    from whisper_rope.cli import evaluate as evaluation_command
    from whisper_rope.cli import finetune as training_command

    captured: Dict[str, argparse.ArgumentParser] = {}
    entry_points = {"whisper-rope": cli.main, "python -m whisper_rope.training": training_command.main,
                    "python -m whisper_rope.evaluation": evaluation_command.main}  # fmt: skip
    for name, main in entry_points.items():

        def capture(parser, *args, _name=name, **kwargs):
            captured[_name] = parser
            raise _Captured

        with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
            try:
                main(["--help"])
            except _Captured:
                pass
        assert name in captured, f"{name} parsed nothing"

    def walk(name: str, parser: argparse.ArgumentParser):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub_parser in action.choices.items():
                    yield from walk(f"{name} {sub_name}", sub_parser)

    return {found: parser for name, parser in captured.items() for found, parser in walk(name, parser)}
