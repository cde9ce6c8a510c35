"""Training windows past 30 s for students whose encoder adds no table: the option and its refusals, the
windows' features, and (with a teacher) the joined transcripts of their halves."""

import pytest
import torch

import whisper_rope
from tests.conftest import SPEECH_CLIPS, randomise_, small_dims
from tests.training.conftest import audio_folder
from whisper_rope.data import WindowPlan, composed_dataset, load_examples
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.distributed import DistributedContext
from whisper_rope.training.pipeline import build_pipeline, window_plan


def clips_folder(tmp_path, copies: int = 3):
    """The speech fixtures, each linked ``copies`` times under other names: about 25 s per copy, so that joined
    windows can pass 30 s."""
    folder = tmp_path / "clips"
    folder.mkdir(parents=True)
    for copy in range(copies):
        for clip in SPEECH_CLIPS:
            (folder / f"{copy}_{clip.name}").symlink_to(clip)
    return folder


def _config(**changes):
    return FinetuneConfig(
        **{"model": "m.pt", "train": "t", "windows": "every-length", "max_window_seconds": 45.0, **changes}
    )


def test_max_window_seconds_past_thirty_is_for_table_free_students_only():
    assert _config(variant="rotary/learned").validate().max_window_seconds == 45.0
    assert window_plan(_config()).max_seconds == 45.0
    assert FinetuneConfig(model="m.pt", train="t").max_window_seconds == 30.0  # today's windows by default
    refusals = [
        (_config(variant="whisper"), "--variant whisper adds one, which positions one 30-s window at most"),
        (_config(variant="rotary+sinusoidal/learned"), "needs a student whose encoder adds no absolute table"),
        (_config(transplant=True, variant="rotary/learned"), "not --transplant, --pad-to-30s or --no-unpadded"),
        (_config(unpadded=False), "not --transplant, --pad-to-30s or --no-unpadded"),
        (_config(windows="clips"), "--max-window-seconds 45 needs --windows every-length"),
        (_config(max_window_seconds=61.0), "max_window_seconds"),
    ]
    for config, message in refusals:
        with pytest.raises(ValueError, match=message) as error:
            config.validate()
        assert "\n" not in str(error.value)


def test_a_student_with_a_table_is_refused_when_the_pipeline_is_built(tmp_path):
    model = whisper_rope.build_model(small_dims(), "whisper")  # the checkpoint's own variant: known once loaded
    config = _config(batch_size=2)
    with pytest.raises(ValueError, match="^--max-window-seconds 45 needs an encoder without an absolute table"):
        build_pipeline(model, audio_folder(tmp_path), None, config, True, None, DistributedContext(), False)


def test_a_window_past_thirty_seconds_gives_all_its_frames(tmp_path):
    student = randomise_(whisper_rope.build_model(small_dims(), "rotary/learned"))
    clips = load_examples(clips_folder(tmp_path), student, pad_30s=False, require_text=False)
    plan = WindowPlan(min_seconds=33.0, max_seconds=45.0, single_share=0.0, sets=1)
    windows = composed_dataset(clips, plan, seed=0)
    index = max(range(len(windows)), key=lambda i: windows.durations[i])
    assert windows.durations[index] > 30.0 and windows.examples[index].split is not None
    item = windows[index]
    assert item.frames > 3000 and item.mel.shape[-1] == item.frames  # no 30-s cut
    # all of it but the last clip's trailing digital silence, cut as unpadded transcription cuts it
    assert 0 <= windows.durations[index] - item.frames / 100 < 0.6
    assert item.teacher_mel is None
    with pytest.raises(Exception, match="cannot be padded to a 30-s window"):
        composed = composed_dataset(
            load_examples(clips_folder(tmp_path / "p"), student, pad_30s=True, require_text=False), plan, 0
        )
        composed[max(range(len(composed)), key=lambda i: composed.durations[i])]
    assert torch.is_tensor(item.mel)


def test_teacher_targets_of_split_windows_are_refused_in_one_line_until_they_exist(tmp_path):
    student = whisper_rope.build_model(small_dims(), "rotary/learned")
    config = _config(batch_size=2)
    with pytest.raises(ValueError, match="^--max-window-seconds 45 trains on reference transcripts only for now"):
        build_pipeline(student, clips_folder(tmp_path), None, config, True, object(), DistributedContext(), False)
