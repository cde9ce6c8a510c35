"""The `whisper-rope` command: upstream's transcribe options, output writers, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from whisper.utils import get_writer

import whisper_rope
from whisper_rope import cli
from whisper_rope.cli.transcribe import TranscribeOptions
from whisper_rope.errors import OptionError

from ..conftest import FIXTURES, randomise_, small_dims

HELLO = FIXTURES / "hello.flac"


@pytest.fixture(scope="module")
def random_model_file(tmp_path_factory):
    """A small random `rotary` checkpoint with upstream's 1500 audio positions (transcribe pads to 30 s)."""
    torch.manual_seed(0)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "rotary/learned-sinusoidal"))
    return whisper_rope.save_checkpoint(model, tmp_path_factory.mktemp("model") / "random.pt")


def _run(*args):
    return cli.main([str(a) for a in args])


def test_transcribe_writes_every_output_format(random_model_file, tmp_path):
    status = _run(
        HELLO,
        "--model",
        random_model_file,
        "--output_dir",
        tmp_path,
        "--fp16",
        "False",
        "--verbose",
        "False",
        "--temperature_increment_on_fallback",
        "None",
        "--word_timestamps",
        "True",
    )
    assert status == 0
    # and the record of what transcribe wrote there (it replaces only those files on a later run)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".whisper-rope-outputs.json"] + [
        f"hello.{ext}" for ext in ("json", "srt", "tsv", "txt", "vtt")
    ]
    result = json.loads((tmp_path / "hello.json").read_text())
    assert result["language"] == "en" and "segments" in result
    # Byte for byte what upstream's writers write for the same result (ours render into memory, then write atomically).
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    defaults = dict(highlight_words=False, max_line_count=None, max_line_width=None, max_words_per_line=None)
    get_writer("all", str(upstream))(result, str(HELLO), defaults)
    for ext in ("json", "srt", "tsv", "txt", "vtt"):
        assert (tmp_path / f"hello.{ext}").read_bytes() == (upstream / f"hello.{ext}").read_bytes(), ext


def test_missing_file_among_several_fails_only_itself(random_model_file, tmp_path, capsys):
    missing = tmp_path / "nope.wav"
    status = _run(
        "transcribe",
        missing,
        HELLO,
        "--model",
        random_model_file,
        "--output_dir",
        tmp_path,
        "--output_format",
        "txt",
        "--fp16",
        "False",
        "--verbose",
        "False",
        "--temperature_increment_on_fallback",
        "None",
    )
    assert status == 1
    assert (tmp_path / "hello.txt").exists() and not (tmp_path / "nope.txt").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("whisper-rope: error: ") and "nope.wav" in err[0]
    assert err[-1] == "whisper-rope: 1 of 2 files failed"
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "neither an existing path nor a model name"),
        (["--variant", "rope/rope"], "invalid encoder scheme 'rope'"),
    ],
)
def test_bad_model_or_variant_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(HELLO, *args, "--verbose", "False")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("whisper-rope: error:")


def test_transcribe_options_validate_writer_options_and_transcript_names_in_one_place():
    """`TranscribeOptions.validate` holds every check of its options, the writers' and the output names' too."""
    with pytest.raises(OptionError, match=r"^--highlight-words requires --word-timestamps$"):
        TranscribeOptions(audio=["a.flac"], highlight_words=True).validate()
    with pytest.warns(UserWarning, match=r"^--max-line-count has no effect without --max-line-width$"):
        TranscribeOptions(audio=["a.flac"], word_timestamps=True, max_line_count=2).validate()
    with pytest.raises(OptionError, match=r"^x/clip\.flac and y/clip\.wav would both be transcribed to out/clip\.txt;"):
        TranscribeOptions(audio=["x/clip.flac", "y/clip.wav"], output_dir="out").validate()
    options = TranscribeOptions(audio=["x/clip.flac"], word_timestamps=True, max_line_width=40, max_line_count=2)
    assert options.validate() is options


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max_line_width", "40"], "--max-line-width requires --word-timestamps"),
        (
            ["--clip_timestamps", "3,1"],
            "--clip-timestamps/--clip_timestamps: each end must be after its start, got 3,1",
        ),
    ],
)
def test_a_refused_transcribe_option_is_one_line_before_the_model_loads(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(HELLO, "--model", tmp_path / "not-loaded.pt", *args, "--output_dir", tmp_path / "out")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"whisper-rope: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_help_lists_upstream_options_and_ours():
    result = subprocess.run(
        [sys.executable, "-m", "whisper_rope.cli", "transcribe", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for option in (
        "--model_dir",
        "--output_format",
        "--best_of",
        "--carry_initial_prompt",
        "--clip_timestamps",
        "--hallucination_silence_threshold",
        "--max_words_per_line",
        "--variant",
        "--rotary_theta",
        "--unpadded",
    ):
        assert option in result.stdout, option
    assert "--eot-penalty EOT_PENALTY" in result.stdout and "0 to 20" in result.stdout


def test_variants_subcommand_lists_presets(capsys):
    assert _run("variants") == 0
    out = capsys.readouterr().out
    assert "rotary/learned-sinusoidal" in out and "decoder schemes: learned, sinusoidal" in out


def _subcommand_options(name: str):
    """{dest: action} of a subcommand's options (its first flag's action per destination)."""
    import argparse

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {}
    for action in subparsers.choices[name]._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            actions.setdefault(action.dest, action)
    return actions


def test_an_option_shared_by_subcommands_has_one_meaning_and_one_default():
    from whisper_rope.experiments.compare import CompareConfig
    from whisper_rope.training.config import FinetuneConfig
    from whisper_rope.weights.loading import DEVICE_HELP, LoadOptions

    commands = {name: _subcommand_options(name) for name in ("transcribe", "evaluate", "finetune", "compare")}
    for name, options in commands.items():
        assert options["device"].help.startswith(DEVICE_HELP), name  # cuda when available, in every subcommand
        assert options["threads"].help == commands["transcribe"]["threads"].help, name
    assert LoadOptions().device is None and CompareConfig().device is None and FinetuneConfig().device is None
    finetune, compare = commands["finetune"], commands["compare"]
    for dest in ("steps", "lr", "batch_size", "warmup_steps", "num_workers", "threads"):
        assert compare[dest].help == finetune[dest].help, dest
        assert getattr(CompareConfig(), dest) == getattr(FinetuneConfig(), dest), dest
    assert "-o" in compare["output"].option_strings and "-o" in finetune["output"].option_strings


def test_compute_type_has_one_default_in_every_command_and_load_model_keeps_upstreams():
    """``--compute_type`` defaults to ``auto`` wherever a command offers it; fine-tuning and compare offer none (they
    load through `load_model`, whose default is upstream's float32: training changes weights that int8 would not
    hold)."""
    import inspect

    from whisper_rope.compute_type import resolve_compute_type
    from whisper_rope.weights.loading import LoadOptions

    commands = {name: _subcommand_options(name) for name in ("transcribe", "evaluate", "finetune", "compare")}
    offered = {name for name, options in commands.items() if "compute_type" in options}
    assert offered == {"transcribe", "evaluate"}
    for name in offered:
        assert commands[name]["compute_type"].default == "auto", name
        assert commands[name]["compute_type"].help == commands["transcribe"]["compute_type"].help, name
    shown = commands["evaluate"]["compute_type"].help
    assert "auto (int8 on the CPU, float32 elsewhere)" in shown and shown.endswith("(default: auto)")
    assert "float32 (upstream's exact numerics; with --batch_size 1, upstream's exact path)" in shown
    assert LoadOptions().compute_type == "auto"
    assert inspect.signature(whisper_rope.load_model).parameters["compute_type"].default == "default"
    assert [resolve_compute_type("auto", device) for device in ("cpu", "cuda")] == ["int8", "float32"]


def test_finetune_help_shows_the_options_each_recipe_sets(capsys):
    from whisper_rope.training.recipes import RECIPES

    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    shown = capsys.readouterr().out
    recipes = shown[shown.index("recipes: --recipe NAME sets these options") :]
    assert "unpadded-rotary: --distill-only --ce-weight 0.0" in recipes
    assert "--lr 0.0001" in recipes and "--lr 3e-05" in recipes
    assert "--transplant-anneal-steps 300 (20.0% of --steps)" in recipes  # counts that follow --steps say so
    assert "--eval-holdout (a fifth of the clips, at most 24)" in recipes and "None" not in recipes
    assert "--windows every-length" in recipes
    for name, recipe in RECIPES.items():
        assert f"  {name}: " in recipes
        assert f"--steps {recipe.defaults['steps']}" in recipes
