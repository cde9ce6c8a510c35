"""One command line.

The same option is spelled and behaves the same in every subcommand: every long option is accepted with dashes
and with underscores, a boolean option is a bare flag everywhere (``--unpadded``, ``--no-unpadded``, and upstream's
``--fp16 False`` spelling too), ``convert`` takes model names like every other command, help texts name what an
option really accepts (folders as well as manifests) and show each default once.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from functools import cache
from typing import Dict, List, Tuple

import pytest
import torch

import whisper_rope

from . import SPEECH, run_cli
from .commands import HELLO, SPEECH_DIMS, checkpoint, command, entry_point_parsers, one_error_line, save_model

SUBCOMMANDS = ["transcribe", "convert", "finetune", "evaluate", "compare"]
#: Options of upstream's ``whisper`` command keep its spelling; their dashed twins are ours.
BOOLEANS = {"transcribe": ["unpadded", "fp16", "verbose", "word_timestamps"], "evaluate": ["unpadded", "fp16"],
            "finetune": ["distill", "strict"], "compare": ["progress"]}  # fmt: skip


def _in_process(*args) -> Tuple[int, str, str]:
    """``whisper-rope ARGS`` in this process (the parser is what is tested; no model is loaded): status, stdout,
    stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = run_cli(*args)
    return status, stdout.getvalue(), stderr.getvalue()


@cache
def help_entries(subcommand: str) -> Dict[str, str]:
    """Option spelling -> its whole help entry (all its spellings, metavar and text), from ``--help``."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"
    try:
        status, text, _ = _in_process(subcommand, "--help")
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    assert status == 0
    entries: List[List[str]] = []  # [the options and metavars, the whole entry]
    for line in text.splitlines():
        if re.match(r"^  -", line):
            entries.append([re.split(r"\s{2,}", line.strip(), maxsplit=1)[0], line.strip()])
        elif entries and line.startswith("   ") and not line.strip().endswith(":"):
            entries[-1][1] += " " + line.strip()  # the help text, when argparse starts it on the next line
    found = {}
    for head, entry in entries:
        for spelling in re.findall(r"(--[a-z0-9][a-z0-9_-]*)", head):
            found[spelling] = entry
    return found


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_long_option_is_accepted_with_dashes_and_with_underscores(subcommand):
    options = help_entries(subcommand)
    missing = []
    for spelling in options:
        name = spelling[2:]
        for twin in {"--" + name.replace("_", "-"), "--" + name.replace("-", "_")}:
            if twin not in options and not name.startswith("no-"):
                missing.append(twin)
    assert not missing, f"{subcommand}: {sorted(missing)}"


def _twins(spelling: str) -> set:
    """``--a-b_c`` -> {``--a-b-c``, ``--a_b_c``}: the option's dashed and underscored spellings."""
    name = spelling[2:]
    return {"--" + name.replace("_", "-"), "--" + name.replace("-", "_")}


def test_every_option_of_every_parser_takes_both_spellings():
    """Every parser a user reaches (each subcommand, and the parsers of ``python -m whisper_rope.training`` and
    ``python -m whisper_rope.evaluation``): each long option is also accepted with dashes and with underscores, and both
    spellings are the same option."""
    parsers = entry_point_parsers()
    assert {"whisper-rope transcribe", "whisper-rope finetune", "python -m whisper_rope.training"} <= set(parsers)
    missing = []
    for name, parser in parsers.items():
        for action in parser._actions:
            for spelling in (s for s in action.option_strings if s.startswith("--")):
                for twin in _twins(spelling):
                    if parser._option_string_actions.get(twin) is not action:
                        missing.append(f"{name}: {twin} (twin of {spelling})")
    assert not missing, missing


@pytest.mark.parametrize("subcommand", ["transcribe", "evaluate"])
def test_the_dashed_and_underscored_spellings_both_parse_as_the_same_option(tmp_path, subcommand):
    """``--compute-type int8 --no_fp16`` (mixed spellings) parses in every subcommand that loads a model: the only
    error is the missing model's."""
    required = [str(HELLO)] if subcommand == "transcribe" else ["--data", str(HELLO)]
    for spellings in (["--compute-type", "int8", "--no_fp16"], ["--compute_type", "int8", "--no-fp16"]):
        status, _, stderr = _in_process(subcommand, *spellings, *required, "--model", tmp_path / "missing.pt")
        assert status == 2, (spellings, stderr)
        one_error_line(stderr, "missing.pt")


@pytest.mark.parametrize("subcommand", list(BOOLEANS))
def test_boolean_options_take_the_same_four_forms_everywhere(tmp_path, subcommand):
    """``--x``, ``--no-x``, ``--x True`` and ``--x False`` all parse: the only error is about the missing model."""
    # finetune reads its --train before any model loads (to refuse a folder too small to train on): a real manifest.
    training = str(SPEECH / "manifest.jsonl")
    required = {"transcribe": [str(HELLO)], "evaluate": ["--data", str(HELLO)], "finetune": ["--train", training],
                "compare": ["--train", str(HELLO), "--eval", f"a={HELLO}"]}[subcommand]  # fmt: skip
    for name in BOOLEANS[subcommand]:
        for form in ([f"--{name}"], [f"--no-{name.replace('_', '-')}"], [f"--{name}", "True"], [f"--{name}", "False"]):
            args = [subcommand, *form, *required, "--model", tmp_path / "missing.pt"]
            if subcommand != "transcribe":
                args += ["--output", tmp_path / "out"]
            status, _, stderr = _in_process(*args)
            assert status == 2, (form, stderr)
            one_error_line(stderr, "missing.pt")


def test_convert_accepts_a_model_name(tmp_path):
    done = command("convert", "tiny.en", tmp_path / "tiny.en.pt")
    assert done.returncode == 0, done.stderr
    converted = checkpoint(tmp_path / "tiny.en.pt")
    reference = whisper_rope.load_model("tiny.en", device="cpu").state_dict()
    for name, tensor in converted["model_state_dict"].items():
        assert torch.equal(tensor.float(), reference[name].float()), name
    exported = command("convert", "tiny.en", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()


FOLDER_OPTIONS = [("finetune", "--train"), ("finetune", "--eval"), ("evaluate", "--data"), ("compare", "--train"),
                  ("compare", "--eval")]  # fmt: skip


@pytest.mark.parametrize("subcommand, option", FOLDER_OPTIONS)
def test_help_says_folders_work_where_they_do(subcommand, option):
    entry = help_entries(subcommand)[option]
    assert re.search(r"folder|director", entry), entry


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_help_shows_each_default_once(subcommand):
    twice = {option: entry for option, entry in help_entries(subcommand).items()
             if len(re.findall(r"default", entry, re.IGNORECASE)) > 1}  # fmt: skip
    assert not twice, twice
    if subcommand == "compare":
        for option, default in (("--steps", "1000"), ("--lr", "1e-05"), ("--output", "compare-output")):  # finetune's
            assert re.search(rf"default:? {re.escape(default)}", help_entries(subcommand)[option]), option


def test_transcribe_takes_batch_size_spelled_with_a_dash(tmp_path):
    model = save_model(tmp_path / "speech.pt", dims=SPEECH_DIMS)
    again = tmp_path / "hello-again.flac"  # a second name: two inputs with one transcript name are refused
    again.write_bytes(HELLO.read_bytes())
    done = command(HELLO, again, "--model", model, "--batch-size", "2", "--output_dir", tmp_path / "out",
                   "--output_format", "txt", "--fp16", "False", "--verbose", "False")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "hello.txt").is_file() and (tmp_path / "out" / "hello-again.txt").is_file()
