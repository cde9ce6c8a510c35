"""--teacher: an adapted checkpoint adapts further, distilled from another model (e.g. its source)."""

import json
from dataclasses import replace

import torch

import whisper_rope
from tests.conftest import randomise_, small_dims
from tests.robustness import assert_one_line_error, run_cli
from tests.training.conftest import audio_folder
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.loop import finetune
from whisper_rope.training.teacher_cache import teacher_fingerprint


def _checkpoint(path, seed, **sizes):
    torch.manual_seed(seed)
    dims = replace(small_dims(n_audio_ctx=1500), **sizes)
    return whisper_rope.save_checkpoint(randomise_(whisper_rope.build_model(dims, "whisper"), std=0.05), path)


def _config(tmp_path, student, **overrides):
    return FinetuneConfig.from_recipe(
        "unpadded-sliced", model=str(student), train=str(audio_folder(tmp_path)), output=str(tmp_path / "run"),
        steps=1, batch_size=2, warmup_steps=1, eval_holdout=2, num_workers=0, progress=False, device="cpu",
        teacher_cache=str(tmp_path / "cache"), **overrides,
    )  # fmt: skip


def test_the_teacher_option_names_the_model_whose_targets_the_student_learns(tmp_path):
    student = _checkpoint(tmp_path / "student.pt", 1)
    teacher = _checkpoint(tmp_path / "teacher.pt", 2)
    finetune(config=_config(tmp_path, student, teacher=str(teacher)))
    (written,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/about.json")]
    expected = teacher_fingerprint(whisper_rope.load_model(teacher, variant="whisper", device="cpu"))
    assert written["teacher_fingerprint"] == expected
    assert expected != teacher_fingerprint(whisper_rope.load_model(student, variant="whisper", device="cpu"))


def test_a_teacher_of_another_size_is_refused_in_one_line(tmp_path, capsys):
    student = _checkpoint(tmp_path / "student.pt", 1)
    teacher = _checkpoint(tmp_path / "wide.pt", 2, n_text_state=32, n_audio_state=32, n_text_head=2, n_audio_head=2)
    arguments = ["finetune", "--recipe", "unpadded-sliced", "--model", student, "--teacher", teacher, "--train",
                 audio_folder(tmp_path), "--output", tmp_path / "run", "--steps", "1", "--batch-size", "2",
                 "--num-workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert run_cli(*arguments) == 2
    assert_one_line_error(capsys.readouterr().err, "--teacher", "n_text_state 32 against")
    assert not (tmp_path / "run" / "model.pt").exists()
