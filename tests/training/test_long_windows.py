"""Training windows past 30 s for students whose encoder adds no table: the option and its refusals, the
windows' features, the teacher's joined transcripts of their halves (cached), and the loss on them."""

import logging
import re
from dataclasses import replace

import pytest
import torch
from whisper.decoding import DecodingOptions

import whisper_rope
from tests.conftest import SPEECH_CLIPS, randomise_, small_dims
from tests.training.conftest import audio_folder
from whisper_rope.data import Batch, Collator, WindowPlan, composed_dataset, load_examples, window_audio, window_halves
from whisper_rope.features import padded_window
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.distributed import DistributedContext
from whisper_rope.training.loop import finetune
from whisper_rope.training.losses import StateWeights
from whisper_rope.training.objective import Objective, StudentForward, micro_batch_loss
from whisper_rope.training.pipeline import build_pipeline, window_plan
from whisper_rope.training.teacher_cache import TargetSpec, TeacherCache, TeacherTargetsCollator, TeacherTargetsDataset


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


def _teacher():
    torch.manual_seed(5)
    return randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500, n_text_ctx=64), "whisper"), 0.05).eval()


def test_the_teacher_transcribes_each_half_of_a_long_window_and_a_second_fill_reads_them(tmp_path):
    teacher = _teacher()
    clips = load_examples(clips_folder(tmp_path), teacher, pad_30s=False, teacher_30s=True, require_text=False)
    windows = composed_dataset(clips, WindowPlan(max_seconds=45.0, timestamp_share=1.0, sets=1), seed=0)
    long = [i for i, w in enumerate(windows.examples) if w.split is not None]
    assert long and all(not windows.timestamps(i) for i in long)  # joined transcripts carry no timestamps
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=("decoder_layers",), transcripts="teacher"))
    entries = cache.fill(windows, torch.device("cpu"), batch_size=2, progress=False)
    assert cache.computed == len(windows) == len(set(entries))
    index = long[0]
    entry = cache.read(entries[index])
    assert set(entry) == {"text_tokens"}  # no states: the teacher never saw the whole window
    halves = window_halves(windows.examples[index], window_audio(windows.examples[index]))
    mels = torch.stack([padded_window(half, 80) for half in halves])
    options = DecodingOptions(language="en", without_timestamps=True, fp16=False)
    said = [list(result.tokens) for result in teacher.decode(mels, options)]
    head = len(windows.tokenizer(index).sot_sequence_including_notimestamps)
    assert entry["text_tokens"].tolist() == (said[0] + said[1])[: 64 - head - 1]
    item = TeacherTargetsDataset(windows, entries, "teacher", ("decoder_layers",))[index]
    assert item.teacher_states == {} and item.frames > 3000
    short = next(i for i in range(len(windows)) if i not in long)
    batch = TeacherTargetsCollator(Collator(windows.tokenizer(0).eot, False))(
        [item, TeacherTargetsDataset(windows, entries, "teacher", ("decoder_layers",))[short]]
    )
    assert batch.teacher_rows.tolist() == [False, True] and batch.teacher_positions[0] == 0
    assert batch.teacher_states["decoder_layers"][:, 0].abs().sum() == 0  # zeros where the teacher has none
    again = cache.fill(windows, torch.device("cpu"), batch_size=2, progress=False)
    assert cache.computed == 0 and again == entries


def both_rows_ce(student, batch) -> torch.Tensor:
    """The summed token cross-entropy of every row of ``batch`` against its labels."""
    with torch.no_grad():
        logits = student.model(batch.mel, batch.tokens, batch.frames).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum")


def test_rows_without_teacher_states_count_in_the_cross_entropy_only():
    torch.manual_seed(0)
    student = StudentForward(randomise_(whisper_rope.build_model(small_dims(), "rotary/learned")), ("decoder_layers",))
    tokens = torch.randint(0, 50, (2, 6))
    labels = tokens.roll(-1, 1)
    hidden = torch.randn(3, 2, 6, small_dims().n_text_state, dtype=torch.float16)
    batch = Batch(
        indices=[0, 1], mel=torch.randn(2, 80, 48), frames=torch.tensor([48, 40]), padded_30s=False, tokens=tokens,
        labels=labels, seconds=[0.5, 0.4], token_lengths=torch.tensor([6, 6]),
        teacher_states={"decoder_layers": hidden}, teacher_positions=torch.tensor([24, 20]),
    )  # fmt: skip
    objective = Objective(ce=0.0, states=StateWeights(decoder_layers=1.0))
    context = DistributedContext()
    both = micro_batch_loss(
        student, None, replace(batch, teacher_rows=torch.tensor([True, True])), objective, context, 1
    )
    assert both[1]["ce"] == 0.0  # every row distilled: today's label-free loss
    assert micro_batch_loss(student, None, batch, objective, context, 1)[1] == both[1]
    one = micro_batch_loss(
        student, None, replace(batch, teacher_rows=torch.tensor([False, True])), objective, context, 1
    )
    assert one[1]["ce"] > 0 and one[1]["decoder_layers_count"] == both[1]["decoder_layers_count"] / 2
    with torch.no_grad():
        ce_row0 = torch.nn.functional.cross_entropy(
            student.model(batch.mel[:1], tokens[:1], batch.frames[:1]).float()[0], labels[0], reduction="sum"
        )
    assert one[1]["ce"] == pytest.approx(float(ce_row0), rel=1e-4)
    # a batch of windows over 30 s only (length-bucketed batches make it common) has no teacher states at all
    none = micro_batch_loss(
        student, None, replace(batch, teacher_states={}, teacher_rows=torch.tensor([False, False])), objective,
        context, 1,
    )  # fmt: skip
    assert none[1]["decoder_layers"] == 0.0 and none[1]["decoder_layers_count"] == 0.0
    assert none[1]["ce"] == pytest.approx(float(both_rows_ce(student, batch)), rel=1e-4)
    assert torch.isfinite(none[0]) and none[0] > 0


def test_a_label_free_run_on_45_s_windows_records_them_and_reads_its_cache_again(tmp_path, caplog):
    torch.manual_seed(3)
    student = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500, n_text_ctx=64), "rotary/learned"), 0.05)
    source = whisper_rope.save_checkpoint(student, tmp_path / "source.pt")
    folder = clips_folder(tmp_path)

    def run(name):
        config = FinetuneConfig.from_recipe(
            "unpadded-rotary", model=str(source), train=str(folder), output=str(tmp_path / name), steps=4,
            batch_size=4, warmup_steps=1, eval_holdout=2, num_workers=0, progress=False, device="cpu",
            teacher_cache=str(tmp_path / "cache"), windows="every-length", max_window_seconds=45.0, window_sets=1,
            previous_text_share=0.0,
            transplant=False,
        )  # fmt: skip
        return finetune(config=config, teacher=_teacher())

    with caplog.at_level(logging.INFO, logger="whisper_rope"):
        result = run("first")
    loaded = whisper_rope.load_model(result.model_path, device="cpu")
    low, high = loaded.adapted_seconds
    assert low < 10.0 and 30.0 < high <= 45.0
    filled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher targets:")]
    computed, total = map(int, re.match(r"teacher targets: (\d+) of (\d+)", filled[-1]).groups())
    assert computed == total > 4  # batches of 4: steps 1-2 are the first epoch, 3-4 the second
    entries = len(list((tmp_path / "cache").rglob("*.safetensors")))
    assert entries == total + 2  # and the 2 held-out clips' teacher references
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="whisper_rope"):
        run("second")  # the same windows, epoch after epoch and run after run: every entry is read
    filled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher targets:")]
    assert filled[-1].startswith(f"teacher targets: 0 of {total} clips computed")
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == entries
