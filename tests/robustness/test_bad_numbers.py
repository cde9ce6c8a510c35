"""Bad numbers are caught at the door.

Non-finite audio samples are repaired with a warning (NaN as silence, infinities clipped to full scale, where
upstream's ffmpeg decoding turns each into a full-scale click), non-finite weights, impossible dims and mistyped
rotary options are refused when the file is loaded, and invalid decoding options are refused in one line before
any model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import whisper_rope
from whisper_rope.cli import main

from .commands import HELLO, TOY_DIMS, checkpoint, command, entry_point_parsers, one_error_line, save_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    path = save_model(tmp_path_factory.mktemp("toy") / "toy.pt")
    return {"path": path, "checkpoint": checkpoint(path)}


def _variant_file(tmp_path: Path, toy: dict, name: str, **changes) -> Path:
    ckpt = {**toy["checkpoint"], **changes}
    path = tmp_path / f"{name}.pt"
    torch.save(ckpt, path)
    return path


def _refused(path: Path, *fragments: str, **load_options) -> str:
    with pytest.raises(whisper_rope.WhisperRopeError) as refused:
        whisper_rope.load_model(path, device="cpu", **load_options)
    message = str(refused.value)
    assert "\n" not in message.strip() and path.name in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ----------------------------------------------------------------------------------------------------------------
# audio


def _float_wav_with(tmp_path: Path, values: dict) -> Path:
    audio = sf.read(str(HELLO), dtype="float32")[0]
    for index, value in values.items():
        audio[index] = value
    path = tmp_path / "float.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")
    return path


def test_non_finite_samples_are_repaired_with_a_warning_naming_the_file(tmp_path):
    from whisper_rope.audio import load_audio

    path = _float_wav_with(tmp_path, {100: np.nan, 200: np.inf, 300: -np.inf})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audio = load_audio(path)
    assert np.isfinite(audio).all()
    # Full scale in 16 bits, as every sample load_audio returns: +inf is 32767 / 32768.
    assert (audio[100], audio[200], audio[300]) == (0.0, 32767 / 32768, -1.0)
    messages = [str(w.message) for w in caught]
    assert any("float.wav" in m and "3 non-finite samples" in m for m in messages), messages


def test_a_nan_sample_does_not_spread_through_resampling_or_channel_mixing(tmp_path):
    """A NaN in one channel of a 44.1 kHz stereo file is repaired before the channels are mixed and the signal is
    resampled (the resampler would smear one NaN over its whole filter length)."""
    from whisper_rope.audio import load_audio

    t = np.arange(44100) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 220 * t)], axis=1)
    clean, damaged = tmp_path / "clean.wav", tmp_path / "damaged.wav"
    sf.write(clean, stereo.astype(np.float32), 44100, subtype="FLOAT")
    stereo[20000, 1] = np.nan
    sf.write(damaged, stereo.astype(np.float32), 44100, subtype="FLOAT")
    reference = load_audio(clean)
    with pytest.warns(UserWarning, match="damaged.wav.* 1 non-finite samples"):
        audio = load_audio(damaged)
    assert audio.shape == reference.shape == (16000,)
    assert np.isfinite(audio).all()
    # Only the neighbourhood of the repaired sample moves, by about the sample's own size (0.2 / 2 channels).
    assert np.abs(audio - reference).max() < 0.15
    assert np.count_nonzero(np.abs(audio - reference) > 1e-4) < 200


def test_a_nan_sample_does_not_change_what_tiny_en_hears(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    sf.write(clean / "clip.wav", sf.read(str(HELLO), dtype="float32")[0], 16000, subtype="FLOAT")
    damaged = _float_wav_with(tmp_path, {5000: np.nan})
    texts, stderrs = [], []
    for source, out in ((clean / "clip.wav", tmp_path / "a"), (damaged, tmp_path / "b")):
        done = command(source, "--model", "tiny.en", "--output_dir", out, "--output_format", "txt", "--fp16", "False",
                       "--verbose", "False", "--beam_size", "None", "--best_of", "None")  # fmt: skip
        assert done.returncode == 0, done.stderr
        texts.append(next(out.glob("*.txt")).read_text().strip())
        stderrs.append(done.stderr)
    assert "hello" in texts[0].lower(), texts
    assert texts[1] == texts[0]
    # The repair is said in one line, in the command's own voice (not Python's file:line and source line).
    warned = [line for line in stderrs[1].splitlines() if "non-finite" in line]
    assert warned == [f"whisper-rope: warning: audio file '{damaged}' holds 1 non-finite samples (NaN or infinite); "
                      "read NaN as silence and infinities as full scale"], stderrs[1]  # fmt: skip
    assert "non-finite" not in stderrs[0]


# ----------------------------------------------------------------------------------------------------------------
# weights and dims


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, toy, value):
    state = dict(toy["checkpoint"]["model_state_dict"])
    weight = state["encoder.blocks.1.mlp.0.weight"].clone()
    weight[3, 4] = value
    state["encoder.blocks.1.mlp.0.weight"] = weight
    path = _variant_file(tmp_path, toy, "nonfinite", model_state_dict=state)
    _refused(path, "encoder.blocks.1.mlp.0.weight")


def test_non_finite_weights_in_a_ctranslate2_model_are_refused(tmp_path):
    from tests.convert_helpers import write_model

    directory = tmp_path / "ct2"
    _, layout, data = write_model(directory)
    data = bytearray(data)
    offset = layout.data["encoder/layer_1/ffn/linear_0/weight"] + 4 * 7
    data[offset : offset + 4] = np.array([np.nan], dtype="<f4").tobytes()
    (directory / "model.bin").write_bytes(bytes(data))
    with pytest.raises(whisper_rope.WhisperRopeError) as refused:
        whisper_rope.load_model(directory, device="cpu")
    assert "encoder/layer_1/ffn/linear_0/weight" in str(refused.value) or "encoder.blocks.1.mlp.0.weight" in str(
        refused.value
    ), refused.value


@pytest.mark.parametrize("field", ["n_audio_head", "n_text_head"])
def test_a_head_count_that_does_not_divide_the_width_is_refused_at_load(tmp_path, toy, field):
    path = _variant_file(tmp_path, toy, "heads", dims={**toy["checkpoint"]["dims"], field: 3})
    _refused(path, field)


ROTARY_OPTIONS = {
    "theta None": {"theta": None},
    "theta nan": {"theta": math.nan},
    "theta negative": {"theta": -5.0},
    "theta a string": {"theta": "10000"},
    "gated a string": {"gated": "no"},
    "unpadded a number": {"unpadded": 2},
    "table scale nan": {"table_scale": [math.nan, 1.0]},
    "table scale above one": {"table_scale": [1.0, 7.0]},
}


@pytest.mark.parametrize("case", list(ROTARY_OPTIONS))
def test_mistyped_rotary_options_are_refused(tmp_path, case):
    source = save_model(tmp_path / "rotary.pt", variant="rotary")
    ckpt = checkpoint(source)
    ckpt["rotary"] = {**ckpt["rotary"], **ROTARY_OPTIONS[case]}
    path = tmp_path / "options.pt"
    torch.save(ckpt, path)
    _refused(path, "rotary")


@pytest.mark.parametrize("theta", [math.nan, 0.0, -1.0, math.inf])
def test_an_invalid_rotary_theta_argument_is_refused(tmp_path, theta):
    source = save_model(tmp_path / "rotary.pt", variant="rotary")
    with pytest.raises(ValueError, match="rotary_theta"):
        whisper_rope.load_model(source, device="cpu", rotary_theta=theta)


# ----------------------------------------------------------------------------------------------------------------
# decoding options


def _unusable_device() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


DECODING_OPTIONS = {
    "--beam_size 0": ("--beam_size", "0"),
    "--best_of 0": ("--best_of", "0"),
    "--temperature_increment_on_fallback 0": ("--temperature_increment_on_fallback", "0"),
    "--temperature_increment_on_fallback -0.2": ("--temperature_increment_on_fallback", "-0.2"),
    "--temperature -1": ("--temperature", "-1"),
    "--temperature nan": ("--temperature", "nan"),
    "--patience 0": ("--patience", "0"),
    "--length_penalty 2": ("--length_penalty", "2"),
    "--batch_size 0": ("--batch_size", "0"),
    "--threads -2": ("--threads", "-2"),
    "--device on a build without it": ("--device", _unusable_device()),
    "--device bogus": ("--device", "bogus"),
    "--clip_timestamps x": ("--clip_timestamps", "x"),
    "--compression_ratio_threshold nan": ("--compression_ratio_threshold", "nan"),
}


@pytest.mark.parametrize("case", list(DECODING_OPTIONS))
def test_invalid_decoding_options_are_refused_in_one_line_before_any_model_loads(tmp_path, case):
    option, value = DECODING_OPTIONS[case]
    missing_model = tmp_path / "not-loaded.pt"  # loading it would fail with another message
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        main([str(HELLO), "--model", str(missing_model), option, value, "--output_dir", str(tmp_path / "out")])
    assert exited.value.code == 2
    line = one_error_line(stderr.getvalue(), option)
    assert "not-loaded.pt" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("subcommand", ["evaluate", "finetune"])
def test_an_unusable_device_is_refused_before_any_model_loads(tmp_path, subcommand):
    data = ("--data",) if subcommand == "evaluate" else ("--train",)
    output = ("--output", tmp_path / "out") if subcommand == "finetune" else ()
    done = command(subcommand, "--model", tmp_path / "not-loaded.pt", *data, HELLO.parent / "hello.txt",
                   "--device", _unusable_device(), *output)  # fmt: skip
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "--device")
    assert not (tmp_path / "out").exists()


def test_toy_dims_are_what_the_tests_assume():
    assert TOY_DIMS["n_audio_state"] % 3 and TOY_DIMS["n_text_state"] % 3


def test_the_edges_of_what_decoding_options_accept_still_pass():
    """The checks refuse only what upstream cannot decode with: its defaults, None where upstream takes None, and the
    boundary values all pass."""
    from whisper_rope.cli.transcribe import TranscribeOptions
    from whisper_rope.weights.loading import LoadOptions

    TranscribeOptions().validate()
    LoadOptions(device="cpu").validate()
    edges = TranscribeOptions(temperature=0.0, best_of=1, beam_size=1, patience=0.5, length_penalty=0.0,
                              temperature_increment_on_fallback=None, compression_ratio_threshold=None,
                              logprob_threshold=None, no_speech_threshold=None, hallucination_silence_threshold=0.0,
                              batch_size=1, clip_timestamps="0,2.5,4", suppress_tokens="-1,50257")  # fmt: skip
    edges.validate()
    TranscribeOptions(length_penalty=1.0, temperature=1.5, clip_timestamps="").validate()
    LoadOptions(device="cpu", threads=0, rotary_theta=1.001, unpadded_margin=0).validate()
    LoadOptions(device="cpu", threads=1024, rotary_theta=1e9, unpadded_margin=1500).validate()
    TranscribeOptions(beam_size=64, best_of=64, patience=10.0, batch_size=1024,
                      temperature_increment_on_fallback=0.01, temperature=5.0).validate()  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# every numeric option of every subcommand

#: What each subcommand needs besides the option under test; its model is a missing file, so that an option let
#: through ends in the missing model's error instead of the option's.
REQUIRED = {"transcribe": [HELLO], "evaluate": ["--data", HELLO], "finetune": ["--train", HELLO],
            "compare": ["--train", HELLO, "--eval", f"a={HELLO}"]}  # fmt: skip


def _numeric_options():
    """(subcommand, option, argparse action, whole) for every option of a ``whisper-rope`` subcommand that takes a
    number (its type int or float, or upstream's optional_int/optional_float)."""
    from whisper.utils import optional_float, optional_int

    for name, parser in entry_point_parsers().items():
        words = name.split()
        if words[0] != "whisper-rope" or len(words) != 2 or words[1] not in REQUIRED:
            continue
        for action in parser._actions:
            if action.type in (int, float, optional_int, optional_float):
                yield words[1], action.option_strings[0], action, action.type in (int, optional_int)


NUMERIC_OPTIONS = list(_numeric_options())


def _run_with(tmp_path: Path, subcommand: str, option: str, value: str):
    """``whisper-rope SUBCOMMAND OPTION VALUE ...`` in this process with a missing model: status and stderr."""
    output = ["--output_dir" if subcommand == "transcribe" else "--output", tmp_path / "out"]
    args = [subcommand, option, value, *REQUIRED[subcommand], "--model", tmp_path / "missing.pt", *output]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code
    return status, stderr.getvalue()


def _refused_naming(tmp_path: Path, subcommand: str, option: str, value: str) -> str:
    status, stderr = _run_with(tmp_path, subcommand, option, value)
    line = one_error_line(stderr, option)
    assert status == 2, stderr
    assert "missing.pt" not in line, line
    assert not (tmp_path / "out").exists()
    return line


def test_every_subcommand_with_numbers_is_walked():
    found = {(subcommand, option) for subcommand, option, _, _ in NUMERIC_OPTIONS}
    expected = {("transcribe", "--beam-size"), ("transcribe", "--threads"), ("finetune", "--lr"),
                ("finetune", "--transplant-anneal-steps"), ("evaluate", "--cap-offset"),
                ("compare", "--seeds")}  # fmt: skip
    assert expected <= found, expected - found


@pytest.mark.parametrize(
    "subcommand, option",
    [(s, o) for s, o, _, whole in NUMERIC_OPTIONS if whole],
)
def test_every_whole_number_option_refuses_a_negative_in_one_line(tmp_path, subcommand, option):
    _refused_naming(tmp_path, subcommand, option, "-5")


@pytest.mark.parametrize(
    "subcommand, option, value",
    [(s, o, v) for s, o, _, whole in NUMERIC_OPTIONS if not whole for v in ("inf", "nan")],
)
def test_every_real_number_option_refuses_infinity_and_nan_in_one_line(tmp_path, subcommand, option, value):
    _refused_naming(tmp_path, subcommand, option, value)


#: Values that a looser check lets through, to fail late (or never): each is refused in one line naming the
#: option and the range it accepts, the range its --help states.
LATE_FAILURES = {
    "finetune --lr inf": ("finetune", "--lr", "inf"),
    "finetune --lr 1e6": ("finetune", "--lr", "1e6"),
    "transcribe --patience 1e308": ("transcribe", "--patience", "1e308"),
    "transcribe --temperature_increment_on_fallback 1e-300": (
        "transcribe", "--temperature-increment-on-fallback", "1e-300"),
    "transcribe --rotary_theta 1e-300": ("transcribe", "--rotary-theta", "1e-300"),
    "evaluate --rotary_theta 1e-300": ("evaluate", "--rotary-theta", "1e-300"),
    "finetune --rotary_theta 1e-300": ("finetune", "--rotary-theta", "1e-300"),
    "transcribe --beam_size 1000000": ("transcribe", "--beam-size", "1000000"),
    "evaluate --beam_size 1000000": ("evaluate", "--beam-size", "1000000"),
    "transcribe --best_of 1000000": ("transcribe", "--best-of", "1000000"),
    "transcribe --threads 100000": ("transcribe", "--threads", "100000"),
    "finetune --threads 100000": ("finetune", "--threads", "100000"),
    "finetune --threads -1": ("finetune", "--threads", "-1"),
    "finetune --seed -1": ("finetune", "--seed", "-1"),
    "finetune --seed 2**32": ("finetune", "--seed", str(2**32)),
    "finetune --transplant-anneal-steps -5": ("finetune", "--transplant-anneal-steps", "-5"),
    "finetune --num-workers 100000": ("finetune", "--num-workers", "100000"),
    "finetune --distill-temperature 1e-300": ("finetune", "--distill-temperature", "1e-300"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LATE_FAILURES))
def test_numbers_that_failed_late_are_refused_at_the_door_with_the_range_the_help_states(tmp_path, case):
    subcommand, option, value = LATE_FAILURES[case]
    line = _refused_naming(tmp_path, subcommand, option, value)
    accepted = re.search(r"must be (.+), got ", line)
    assert accepted, line
    action = next(a for s, o, a, _ in NUMERIC_OPTIONS if (s, o) == (subcommand, option))
    assert accepted.group(1) in action.help.replace("%%", "%"), (accepted.group(1), action.help)


def test_the_help_of_every_numeric_option_states_the_range_its_error_names(tmp_path):
    """For each numeric option, a value far out of range (-1e12 or 1e12) is refused with "must be RANGE", and RANGE
    is in the option's help."""
    unstated = []
    for subcommand, option, action, _ in NUMERIC_OPTIONS:
        refusals = []
        for value in ("-1000000000000", "1000000000000"):
            status, stderr = _run_with(tmp_path, subcommand, option, value)
            found = re.search(r"must be (.+?), got ", stderr)
            refusals += [(status, found, stderr)] * (found is not None)
        stated = [
            status == 2 and found and found.group(1) in action.help.replace("%%", "%") for status, found, _ in refusals
        ]
        if not refusals or not all(stated):
            unstated.append(f"{subcommand} {option}: {refusals} / help {action.help!r}")
    assert not unstated, "\n".join(unstated)


def test_a_first_temperature_above_one_keeps_itself_as_its_only_temperature():
    from whisper_rope.cli.transcribe import TranscribeOptions

    assert TranscribeOptions(temperature=1.5).temperatures() == (1.5,)
    fallbacks = TranscribeOptions(temperature=0.5, temperature_increment_on_fallback=0.25).temperatures()
    assert [round(t, 6) for t in fallbacks] == [0.5, 0.75, 1.0]
