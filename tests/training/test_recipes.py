"""Recipes, the label-free one-command run, staged training, and defaults that cannot defeat themselves."""

import argparse
import json
from pathlib import Path

import pytest
import torch

import whisper_rope
from tests.conftest import FIXTURES, randomise_, small_dims
from tests.training.conftest import audio_folder
from whisper_rope.audio import load_audio
from whisper_rope.cli.finetune import add_finetune_arguments, config_from_args, main
from whisper_rope.experiments.report import final_evaluation
from whisper_rope.features import padded_window, real_frame_counts
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.loop import finetune
from whisper_rope.training.recipes import RECIPES, STEP_COUNTS
from whisper_rope.training.transplant import rotary_gates

SPEECH = FIXTURES / "speech"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small random 'pretrained' model with upstream's scheme and a full 30-s encoder context."""
    torch.manual_seed(3)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05)
    return whisper_rope.save_checkpoint(model, tmp_path_factory.mktemp("source") / "source.pt")


def _parse(argv):
    return config_from_args(add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_a_recipe_fills_what_the_command_line_leaves_open():
    config = _parse(["--recipe", "unpadded-rotary", "--train", "x", "--steps", "7", "--no-transplant"])
    assert config.steps == 7 and config.transplant is False  # given explicitly: they win
    assert config.variant == "rotary/learned" and config.distill_only and config.ce_weight == 0.0  # the recipe's
    assert config.recipe == "unpadded-rotary"
    plain = _parse(["--train", "x"])
    assert plain == FinetuneConfig(train="x").validate()  # no recipe: the dataclass defaults
    assert FinetuneConfig.from_recipe("unpadded-sliced", train="x", lr=1e-6).validate().lr == 1e-6
    for name, recipe in RECIPES.items():
        FinetuneConfig.from_recipe(name, train="x").validate()
        assert recipe.summary and name in add_finetune_arguments(argparse.ArgumentParser()).format_help()


def test_the_label_free_recipe_turns_a_folder_of_audio_into_a_loadable_unpadded_rotary_model(tmp_path, source):
    config = FinetuneConfig.from_recipe(
        "unpadded-rotary", model=str(source), train=str(audio_folder(tmp_path)), output=str(tmp_path / "run"),
        steps=4, batch_size=2, transplant_anneal_steps=2, warmup_steps=1, eval_holdout=2, num_workers=0,
        progress=False, device="cpu", teacher_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    result = finetune(config=config)
    assert result.model.variant == "rotary/learned" and result.model.unpadded
    loaded = whisper_rope.load_model(result.model_path, device="cpu")
    assert loaded.variant == "rotary/learned" and loaded.unpadded and not loaded.gated_rotary
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert {"decoder_layers", "encoder_output"} <= set(train[0]) and train[0]["decoder_layers"] > 0
    assert [r["finished"] for r in records if r["event"] == "transplant"] == [True]
    holdout = [json.loads(line) for line in (tmp_path / "run" / "holdout.jsonl").read_text().splitlines()]
    trained_on = (tmp_path / "run" / "train-without-holdout.jsonl").read_text().splitlines()
    assert len(holdout) == 2 and len(trained_on) == len(list(SPEECH.glob("*.flac"))) - 2
    assert all("text" in row for row in holdout)  # the teacher's transcripts are the references
    table = final_evaluation(result, config, progress=False)
    assert "| fine-tuned | rotary/learned | unpadded |" in table and "teacher's 30-s transcripts" in table
    # beside it the source (the teacher) on 30-s windows, scored on the clips and on windows of them joined
    assert "| source | sinusoidal/learned | 30-s windows |" in table
    scored = (tmp_path / "run" / "holdout-every-length.jsonl").read_text().splitlines()
    assert len(scored) > len(holdout) and "all-clips.flac" in scored[-1]
    assert (tmp_path / "run" / "final_evaluation.md").read_text().strip() == table.strip()


def test_staged_training_moves_only_the_positional_path_first(tmp_path, source):
    folder = audio_folder(tmp_path)
    model = whisper_rope.load_model(source, variant="rotary/learned", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(
        model=str(source), train=str(folder), output=str(tmp_path / "run"), steps=2, stage_steps=2, batch_size=2,
        lr=1e-3, distill_only=True, num_workers=0, progress=False, device="cpu", teacher_cache=str(tmp_path / "c"),
    )  # fmt: skip
    trained = finetune(model, config=config).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], trained[k])}
    assert changed and all(
        (".attn.query." in k or ".attn.key." in k or k == "decoder.positional_embedding") for k in changed
    )
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)


def test_a_default_transplant_ends_with_open_gates_and_no_tables(tmp_path, source):
    manifest = tmp_path / "clips.jsonl"
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()][:2]
    manifest.write_text("".join(json.dumps({**r, "audio": str(SPEECH / r["audio"])}) + "\n" for r in rows))
    config = FinetuneConfig(
        model=str(source), train=str(manifest), output=str(tmp_path / "run"), transplant=True, steps=4, batch_size=2,
        num_workers=0, progress=False, device="cpu",
    )  # fmt: skip
    model = whisper_rope.load_model(source, variant="rotary+sinusoidal/rotary+learned", gated_rotary=True)
    hybrid = finetune(model, config=config)
    assert hybrid.model.variant == "rotary/rotary"  # finalised: every gate reached 1 as the tables reached 0
    assert all(float(g.min()) == 1.0 for g in rotary_gates(model))


def test_settings_that_defeat_themselves_are_warned_about():
    assert FinetuneConfig(train="x", steps=20).effective_warmup == 2  # the README's 20-step run reaches its lr
    config = FinetuneConfig(train="x", steps=20, warmup_steps=50, transplant=True, transplant_gates="learned")
    messages = config.self_defeating()
    assert any("reaches only 40 % of --lr" in m for m in messages)
    assert any("ends with no position information" in m for m in messages)
    with pytest.raises(ValueError, match="leaves nothing to learn"):
        FinetuneConfig(train="x", ce_weight=0.0).validate()
    with pytest.raises(ValueError, match="--stage-policy"):
        FinetuneConfig(train="x", stage_policy="(").validate()


# --------------------------------------------------------------------------------------------------------------------
# A recipe's step counts follow --steps; its hold-out follows the folder


def test_a_recipes_step_counts_follow_an_overridden_steps():
    full = _parse(["--recipe", "unpadded-rotary", "--train", "x"])
    assert (full.steps, full.transplant_anneal_steps, full.warmup_steps) == (1500, 300, 20)  # the measured recipe
    short = _parse(["--recipe", "unpadded-rotary", "--train", "x", "--steps", "20"])
    assert (short.transplant_anneal_steps, short.warmup_steps) == (4, 1)  # the same fractions of 20 steps
    assert short.self_defeating() == []
    assert FinetuneConfig.from_recipe("unpadded-rotary", train="x", steps=20).transplant_anneal_steps == 4
    assert _parse(["--recipe", "unpadded-sliced", "--train", "x", "--steps", "150"]).warmup_steps == 10
    given = _parse(["--recipe", "unpadded-rotary", "--train", "x", "--steps", "20", "--warmup-steps", "3"])
    assert (given.transplant_anneal_steps, given.warmup_steps) == (4, 3)  # a count given explicitly wins
    for recipe in RECIPES.values():  # every step count of a recipe is a fraction of its run, none fixed
        assert not set(recipe.defaults) & set(STEP_COUNTS), recipe.summary


def test_a_recipe_run_shortened_with_steps_ends_as_the_model_the_recipe_promises(tmp_path, source):
    config = FinetuneConfig.from_recipe(
        "unpadded-rotary", model=str(source), train=str(audio_folder(tmp_path)), output=str(tmp_path / "run"),
        steps=5, batch_size=2, num_workers=0, progress=False, device="cpu", teacher_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    result = finetune(config=config)
    assert result.model.variant == "rotary/learned" and result.model.unpadded
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["finished"] for r in records if r["event"] == "transplant"] == [True]
    # The recipe's own hold-out (a fifth of the clips) is what the final evaluation scores.
    assert len((tmp_path / "run" / "holdout.jsonl").read_text().splitlines()) == len(list(SPEECH.glob("*.flac"))) // 5
    assert "teacher's 30-s transcripts" in final_evaluation(result, config, progress=False)


def test_the_sliced_recipe_learns_the_teachers_token_distributions_and_keeps_a_margin_of_padding(tmp_path, source):
    config = FinetuneConfig.from_recipe(
        "unpadded-sliced", model=str(source), train=str(audio_folder(tmp_path)), output=str(tmp_path / "run"),
        steps=1, batch_size=2, eval_holdout=2, num_workers=0, progress=False, device="cpu",
        teacher_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    margin = RECIPES["unpadded-sliced"].defaults["unpadded_margin"]
    assert config.unpadded_margin == margin == 50
    result = finetune(config=config)
    start = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["objective"]["kl"] == 1.0 and start["objective"]["decoder_layers"] == 1.0  # hidden states and KL
    assert start["objective"]["ce"] == 0.0 and config.distill_temperature == 2.0  # label-free: no hard targets
    loaded = whisper_rope.load_model(result.model_path, device="cpu")
    assert loaded.unpadded and loaded.unpadded_margin == margin
    penalty = RECIPES["unpadded-sliced"].defaults["eot_penalty"]
    assert loaded.eot_penalty == config.eot_penalty == start["eot_penalty"] == penalty == 2.0  # at decoding only
    clip = load_audio(sorted(SPEECH.glob("*.flac"))[0])
    mel = padded_window(clip, loaded.dims.n_mels)[None]
    real = (int(real_frame_counts(mel)) + 1) // 2  # audio positions of the clip's own frames
    assert 0 < real < 1500 - margin
    with torch.no_grad():
        encoded = loaded.embed_audio(mel)
    assert encoded.shape[1] == real + margin  # its frames and 1 s of the padding, not 30 s


def test_the_warm_up_warning_names_what_is_wrong_in_numbers_that_add_up():
    def warnings(steps, warmup):
        return FinetuneConfig(train="x", steps=steps, warmup_steps=warmup).self_defeating()

    assert warnings(20, 10) == []
    [whole] = warnings(20, 20)
    assert whole == (
        "--warmup-steps 20 with --steps 20: the learning rate rises for the whole run and never decays; give "
        "--warmup-steps at most 10 (half of --steps)"
    )
    [most] = warnings(20, 15)
    assert "rises for 15 of the 20 steps and decays for only 5" in most and "at most 10" in most
    [beyond] = warnings(20, 50)
    assert "reaches only 40 % of --lr 1e-05" in beyond and "at most 10" in beyond


def _manifest_of(tmp_path: Path, rows: int) -> Path:
    """A manifest of ``rows`` rows (the fixture clips, repeated: only the rows are counted before a model loads)."""
    clips = sorted(SPEECH.glob("*.flac"))
    path = tmp_path / f"{rows}.jsonl"
    path.write_text("".join(json.dumps({"audio": str(clips[i % len(clips)])}) + "\n" for i in range(rows)))
    return path


@pytest.mark.parametrize("rows, held_out", [(10, 2), (30, 6), (119, 23), (500, 24)])
def test_a_recipes_default_hold_out_is_a_share_of_the_clips_at_most_24(tmp_path, monkeypatch, rows, held_out):
    seen = {}

    def stop_before_loading(model, train, eval, config, *rest):
        seen["eval_holdout"] = config.eval_holdout
        raise SystemExit(0)

    monkeypatch.setattr("whisper_rope.training.loop._run", stop_before_loading)
    argv = ["--recipe", "unpadded-sliced", "--train", str(_manifest_of(tmp_path, rows)), "-o", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        finetune(config=_parse(argv))
    assert seen["eval_holdout"] == held_out
    explicit = _parse([*argv, "--eval-holdout", "1"])
    with pytest.raises(SystemExit):
        finetune(config=explicit)
    assert seen["eval_holdout"] == 1


def test_a_folder_too_small_to_train_on_is_refused_before_any_model_loads_naming_the_options(
    tmp_path, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the folder's size was checked")

    monkeypatch.setattr("whisper_rope.training.loop.load_model", no_loading)
    manifest = _manifest_of(tmp_path, 8)
    output = tmp_path / "run"
    argv = ["--recipe", "unpadded-sliced", "--train", str(manifest), "--output", str(output), "--device", "cpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"whisper-rope: error: {str(manifest)!r} has 8 clips: holding out 1 (--eval-holdout) leaves 7 to train on, "
        "fewer than one batch (--batch-size 8); give a smaller --batch-size or --eval-holdout, or more clips"
    )
    assert not output.exists()
    assert main([*argv[:2], "--train", str(_manifest_of(tmp_path, 3)), *argv[4:], "--eval-holdout", "0"]) == 2
    assert "has 3 clips, fewer than one batch (--batch-size 8); give a smaller --batch-size" in capsys.readouterr().err
