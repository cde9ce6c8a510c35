"""One way to declare command-line options (whisper_rope.cli.arguments): every subcommand is built from dataclass
fields, so every option has both spellings and every boolean takes a bare flag, a value or a negation."""

import argparse
from dataclasses import dataclass, field, fields
from typing import List, Optional

import pytest

from whisper_rope.cli import build_parser
from whisper_rope.cli.arguments import ArgumentParser, add_dataclass_arguments, dataclass_from_args
from whisper_rope.fields import NamedPath, PathText, opt, option


@dataclass
class Job:
    batch_size: int = field(default=4, metadata=option("clips per batch"))
    fp16: bool = field(default=True, metadata=option("half precision"))
    unpadded: Optional[bool] = field(default=None, metadata=option("own frames"))
    files: List[str] = field(default_factory=list, metadata=option("inputs", positional=True, nargs="*"))


@dataclass
class Declared:
    """`Job`'s first and last options, declared with `opt`."""

    batch_size: int = opt(4, "clips per batch")
    files: List[str] = opt([], "inputs", positional=True, nargs="*")
    seeds: List[int] = opt([0, 1], "seeds", nargs="+", type=int)


def test_opt_declares_the_same_field_as_field_and_option():
    declared = {spec.name: spec for spec in fields(Declared)}
    written = {spec.name: spec for spec in fields(Job)}
    for name in ("batch_size", "files"):
        assert declared[name].metadata == written[name].metadata
    assert declared["batch_size"].default == 4 and Declared().files == []
    assert dict(declared["seeds"].metadata) == {"help": "seeds", "nargs": "+", "type": int}


def test_opt_gives_each_instance_its_own_copy_of_a_list_default():
    first, second = Declared(), Declared()
    first.seeds.append(2)
    assert first.seeds == [0, 1, 2] and second.seeds == [0, 1] and Declared().seeds == [0, 1]
    parser = add_dataclass_arguments(ArgumentParser(), Declared)
    assert dataclass_from_args(Declared, parser.parse_args(["a.flac"])) == Declared(files=["a.flac"])
    assert "seeds (default: [0, 1])" in parser.format_help()


@dataclass
class Paths:
    output: PathText = opt("out", "where to write")
    sets: List[NamedPath] = opt([], "NAME=PATH or PATH", nargs="*")
    label: str = opt("x", "not a path")


def test_path_typed_fields_expand_the_home_directory_from_the_command_line_and_a_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["--output", "~/o", "--sets", "a=~/a", "~/b", "--label", "~/n"]
    parsed = dataclass_from_args(Paths, add_dataclass_arguments(ArgumentParser(), Paths).parse_args(argv))
    assert parsed == Paths(output=str(tmp_path / "o"), sets=[f"a={tmp_path / 'a'}", str(tmp_path / "b")], label="~/n")
    unset = add_dataclass_arguments(ArgumentParser(), Paths, defaults=False).parse_args([])
    from_file = dataclass_from_args(Paths, unset, {"output": "~/f", "sets": ["c=~/c"], "label": "~/l"})
    assert from_file == Paths(output=str(tmp_path / "f"), sets=[f"c={tmp_path / 'c'}"], label="~/l")


def _parse(*argv: str) -> Job:
    parser = add_dataclass_arguments(ArgumentParser(), Job)
    return dataclass_from_args(Job, parser.parse_args(argv))


@pytest.mark.parametrize(
    "argv, expected",
    [
        ((), Job()),
        (("--batch-size", "8"), Job(batch_size=8)),
        (("--batch_size", "8"), Job(batch_size=8)),
        (("--fp16",), Job(fp16=True)),
        (("--fp16", "False"), Job(fp16=False)),
        (("--fp16=no",), Job(fp16=False)),
        (("--no-fp16",), Job(fp16=False)),
        (("--unpadded", "a.flac"), Job(unpadded=True, files=["a.flac"])),  # bare, before an argument
        (("--unpadded", "true", "a.flac"), Job(unpadded=True, files=["a.flac"])),
        (("a.flac", "--unpadded"), Job(unpadded=True, files=["a.flac"])),
    ],
)
def test_options_are_spelled_and_read_alike(argv, expected):
    assert _parse(*argv) == expected


def test_a_boolean_value_that_is_not_one_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        _parse("--fp16=maybe")
    assert "argument --fp16: expected True or False, got 'maybe'" in capsys.readouterr().err


def test_help_shows_each_default_once():
    text = add_dataclass_arguments(argparse.ArgumentParser(), Job).format_help()
    assert text.count("(default: 4)") == 1 and text.count("(default: True)") == 1
    assert "--no-fp16" in text and "same as --fp16 False" in text


def _subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["transcribe", "convert", "finetune", "evaluate", "compare"])
def test_every_subcommand_has_both_spellings_and_negatable_booleans(command):
    parser = _subcommands()[command]
    names = {name for action in parser._actions for name in action.option_strings if name.startswith("--")}
    for name in {n for n in names if not n.startswith("--no-")}:
        twin = "--" + (name[2:].replace("-", "_") if "-" in name[2:] else name[2:].replace("_", "-"))
        assert twin in names, f"{command}: {name} has no twin {twin}"
    booleans = [action for action in parser._actions if action.metavar == "BOOL"]
    assert booleans, command
    for action in booleans:
        assert f"--no-{action.option_strings[0][2:]}" in names, (command, action.option_strings)


def test_transcribe_reads_upstreams_spelling_and_ours_the_same():
    parser = build_parser()
    upstream = parser.parse_args(
        ["transcribe", "--fp16", "False", "--batch_size", "2", "--word_timestamps", "True", "a"]
    )
    ours = parser.parse_args(["transcribe", "--no-fp16", "--batch-size", "2", "--word-timestamps", "a"])
    assert vars(upstream) == vars(ours)
    assert (ours.fp16, ours.batch_size, ours.word_timestamps, ours.audio) == (False, 2, True, ["a"])


def test_none_is_a_value_where_upstream_gives_it_one():
    """Upstream's ``--temperature_increment_on_fallback None`` turns the fallback off; it must not become 0.2."""
    from whisper_rope.cli.transcribe import TranscribeOptions

    args = build_parser().parse_args(
        ["transcribe", "--temperature_increment_on_fallback", "None", "--best_of", "None", "a"]
    )
    options = dataclass_from_args(TranscribeOptions, args, keep_none=True)
    assert options.temperatures() == (0.0,) and options.best_of is None
    assert dataclass_from_args(TranscribeOptions, args).temperatures()[:2] == (0.0, 0.2)  # what keep_none prevents
