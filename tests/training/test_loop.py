"""Fine-tuning (whisper_rope.training): overfitting, exact resume, DDP, padding masks, checkpoints, distillation."""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from whisper.decoding import DecodingOptions

from tests.conftest import FIXTURES, randomise_, small_dims
from whisper_rope import build_model, load_model, save_checkpoint
from whisper_rope.cli.finetune import add_finetune_arguments, config_from_args, main
from whisper_rope.data import IGNORE_INDEX, Collator, load_examples
from whisper_rope.errors import TrainingError
from whisper_rope.fs.outputs import LOCK_FILE
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.loop import CURVES_FILE, LOG_FILE, finetune
from whisper_rope.training.optim import build_optimizer, lr_factor, select_trainable
from whisper_rope.training.state import MODEL_FILE, STATE_FILE, latest_checkpoint
from whisper_rope.training.teacher_cache import TargetSpec, TeacherCache, TeacherTargetsDataset
from whisper_rope.weights.format import read_checkpoint

SPEECH = FIXTURES / "speech"
ROWS = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()]
REPO = Path(__file__).resolve().parents[2]


def write_manifest(path: Path, rows, text: bool = True) -> Path:
    lines = [json.dumps({"audio": str(SPEECH / r["audio"]), **({"text": r["text"]} if text else {})}) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def quick_config(output: Path, **overrides) -> FinetuneConfig:
    """Settings for short CPU runs of the small models (one thread: on a busy machine several are much slower)."""
    settings = dict(
        output=str(output),
        steps=2,
        batch_size=2,
        lr=1e-3,
        warmup_steps=0,
        num_workers=0,
        progress=False,
        log_every=1,
        device="cpu",
        seed=0,
        threads=1,
        teacher_cache=str(output.parent / "teacher-cache"),
    )
    settings.update(overrides)
    return FinetuneConfig(**settings)


def state_dict_of(path: Path):
    return read_checkpoint(path)["model_state_dict"]


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def records(output: Path, event: str):
    lines = (output / LOG_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# --------------------------------------------------------------------------------------------------------------------
# A rotary model trained unpadded from scratch on two clips (shared by several tests).


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overfit")
    manifest = write_manifest(folder / "two.jsonl", ROWS[:2])
    torch.manual_seed(0)
    model = build_model(small_dims(), "rotary")
    config = quick_config(
        folder / "run",
        steps=48,
        lr=3e-3,
        warmup_steps=3,
        weight_decay=0.0,
        eval_every=16,
        save_every=16,
        keep_last=2,
        log_every=4,
    )
    started = time.perf_counter()
    result = finetune(model, manifest, manifest, config)
    return result, folder / "run", time.perf_counter() - started


def test_small_model_overfits_two_clips_and_greedy_decoding_recovers_a_transcript(overfit):
    result, output, _ = overfit
    losses = [r["loss"] for r in records(output, "train")]
    assert losses[0] > 5.0
    assert losses[-1] < 0.05 * losses[0]
    evals = records(output, "eval")
    assert [e["step"] for e in evals] == [16, 32, 48]
    final = evals[-1]
    hits = [e for e in final["examples"] if e["hypothesis"].strip() == e["reference"]]
    assert hits, final["examples"]
    assert final["wer"] <= 0.5
    assert result.best_wer == min(e["wer"] for e in evals)


def test_training_writes_loadable_checkpoints_logs_and_curves(overfit):
    result, output, _ = overfit
    assert sorted(p.name for p in output.glob("step-*")) == ["step-0000032", "step-0000048"]  # keep_last 2
    assert result.model_path == output / MODEL_FILE and result.steps == 48
    for path in [output / MODEL_FILE, output / "best" / MODEL_FILE, output / "step-0000048" / STATE_FILE]:
        torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and data only
    state = torch.load(output / "step-0000048" / STATE_FILE, weights_only=True)
    assert state["step"] == 48 and state["variant"] == "rotary/rotary" and state["trained_unpadded"] is True
    assert state["sampler"]["position"] == 48 and state["config"]["lr"] == 3e-3
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    best = json.loads((output / "best" / "metrics.json").read_text())
    assert best["wer"] == result.best_wer and best["step"] == result.best_step

    reloaded = load_model(output / MODEL_FILE, device="cpu")
    assert reloaded.unpadded is True  # trained unpadded: transcribe drops the 30-s padding
    as_float16 = {k: v.half().float() for k, v in result.model.state_dict().items()}  # --save-dtype float16
    assert max_difference(reloaded.state_dict(), as_float16) == 0.0
    assert max_difference(reloaded.state_dict(), result.model.state_dict()) > 0.0
    assert (output / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert records(output, "start")[0]["unpadded"] is True


def test_transcribing_the_saved_model_through_upstream_decode_gives_the_trained_text(overfit):
    result, output, _ = overfit
    model = load_model(output / MODEL_FILE, device="cpu")
    best_hit = next(e for e in records(output, "eval")[-1]["examples"] if e["hypothesis"].strip() == e["reference"])
    row = next(r for r in ROWS if r["text"] == best_hit["reference"])
    import whisper

    audio = whisper.load_audio(str(SPEECH / row["audio"]))
    # As `whisper-rope transcribe` feeds it: a 30-s window, whose padding the unpadded model drops.
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))
    decoded = model.decode(mel, DecodingOptions(language="en", without_timestamps=True, fp16=False))
    assert decoded.text.strip() == row["text"]


def _unique_bytes(folder: Path, pattern: str) -> int:
    """Bytes on disk of the files under ``folder`` matching ``pattern``, a hard-linked file counted once."""
    inodes = {p.stat().st_ino: p.stat().st_size for p in folder.rglob(pattern) if p.is_file()}
    return sum(inodes.values())


def test_a_run_folder_holds_one_float16_copy_of_the_final_model_and_the_disk_it_needs_is_logged(tmp_path, caplog):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    output = tmp_path / "run"
    model = build_model(small_dims(), "rotary")
    # As a recipe runs: evaluation at the end only (best/ is the final model), --save-every 0.
    with caplog.at_level("INFO", logger="whisper_rope"):
        result = finetune(model, manifest, manifest, quick_config(output, steps=2))
    assert not list(output.glob("step-*"))
    final = output / MODEL_FILE
    assert (output / "best" / MODEL_FILE).stat().st_ino == final.stat().st_ino  # a hard link, not a copy
    assert _unique_bytes(output, "*.pt") == final.stat().st_size
    assert {t.dtype for t in state_dict_of(final).values()} == {torch.float16}
    float32_file = save_checkpoint(result.model, tmp_path / "float32.pt")
    assert final.stat().st_size < 0.52 * float32_file.stat().st_size
    estimate = records(output, "start")[0]["disk_bytes"]
    assert estimate["model"] == pytest.approx(final.stat().st_size, rel=0.02)
    assert estimate["step_checkpoints"] == 0 and estimate["best"] is True
    logged = [r.getMessage() for r in caplog.records if "this run needs up to" in r.getMessage()]
    assert logged and "model.pt 7 MB (float16)" in logged[0], logged


def test_step_checkpoints_link_the_model_files_of_their_step_and_the_estimate_matches_their_size(tmp_path):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    output = tmp_path / "run"
    config = quick_config(output, steps=3, save_every=2, eval_every=2, save_dtype="float32")
    finetune(build_model(small_dims(), "rotary"), manifest, manifest, config)
    assert sorted(p.name for p in output.glob("step-*")) == ["step-0000002", "step-0000003"]  # every 2 and the end
    final = output / MODEL_FILE
    assert (output / "step-0000003" / MODEL_FILE).stat().st_ino == final.stat().st_ino
    assert {t.dtype for t in state_dict_of(final).values()} == {torch.float32}
    state = output / "step-0000003" / STATE_FILE
    assert torch.load(state, weights_only=True)["exact_weights"] == {}  # float32 files hold the exact weights
    estimate = records(output, "start")[0]["disk_bytes"]
    # A float32 run's state holds the two AdamW moments of every trained weight, and no rounded weights.
    assert estimate["state"] == pytest.approx(state.stat().st_size, rel=0.02)
    assert estimate["model"] == pytest.approx(final.stat().st_size, rel=0.02)
    models = {p.stat().st_ino for p in output.rglob(MODEL_FILE)}
    assert len(models) <= 3  # step 2 (linked to best/ when step 2 was best), step 3 = model.pt, best/


def _written(output: Path):
    """{file: modification time} of a run's files (the lock file, rewritten by every claim, left out)."""
    return {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def test_an_identical_finished_run_is_recognised_and_one_of_other_settings_refused(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    source = tmp_path / "source.pt"
    save_checkpoint(build_model(small_dims(), "rotary"), source)
    output = tmp_path / "run"
    command = ["--model", str(source), "--train", str(manifest), "--output", str(output), "--steps", "2",
               "--batch-size", "2", "--num-workers", "0", "--no-progress", "--device", "cpu",
               "--save-every", "1"]  # fmt: skip
    assert main(command) == 0
    first = capsys.readouterr().out
    assert "trained 2 steps" in first
    before = _written(output)
    assert main([*command, "--threads", "1"]) == 0  # the same run; threads change nothing it writes
    again = capsys.readouterr()
    assert (
        again.out.strip() == f"{output} already holds this run, finished at step 2; final model {output / MODEL_FILE}"
    )
    assert _written(output) == before  # nothing rewritten
    assert main([*command, "--steps", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "holds a finished run of other settings (--steps 2 there, 3 now): choose another --output, or pass --resume "
        "to continue its last step checkpoint"
    )
    assert _written(output) == before


# --------------------------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    manifest = write_manifest(tmp_path / "three.jsonl", ROWS[:3])
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    save_checkpoint(build_model(small_dims(), "rotary"), source)
    # Three clips in batches of two: the sampler wraps into a new epoch; SpecAugment and gradient accumulation on.
    settings = dict(
        model=str(source),
        train=str(manifest),
        steps=4,
        grad_accum=2,
        spec_augment=True,
        warmup_steps=2,
        schedule="linear",
        gated_rotary=True,
    )
    straight = finetune(config=quick_config(tmp_path / "straight", save_every=2, keep_last=5, **settings))
    assert straight.steps == 4
    step_two = tmp_path / "straight" / "step-0000002"
    assert {t.dtype for t in state_dict_of(step_two / MODEL_FILE).values()} == {torch.float16}
    exact = torch.load(step_two / STATE_FILE, weights_only=True)["exact_weights"]
    assert exact and {t.dtype for t in exact.values()} == {torch.float32}  # what float16 rounds, kept for resume
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "straight" / "step-0000002", interrupted / "step-0000002")
    resumed = finetune(config=quick_config(interrupted, resume=str(interrupted), **settings))
    assert resumed.steps == 4
    straight_weights = state_dict_of(tmp_path / "straight" / MODEL_FILE)
    assert max_difference(straight_weights, state_dict_of(interrupted / MODEL_FILE)) <= 1e-6
    straight_losses = [(r["step"], r["loss"]) for r in records(tmp_path / "straight", "train")][2:]
    resumed_losses = [(r["step"], r["loss"]) for r in records(interrupted, "train")]
    assert [s for s, _ in resumed_losses] == [3, 4]
    assert [loss for _, loss in resumed_losses] == pytest.approx([loss for _, loss in straight_losses], abs=1e-6)
    gates = [v for k, v in state_dict_of(interrupted / MODEL_FILE).items() if k.endswith("rotary_gate")]
    assert gates and any(g.abs().max() > 0 for g in gates)  # the new gates trained


def test_a_holdout_of_every_clip_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --eval-holdout was checked")

    monkeypatch.setattr("whisper_rope.training.loop.load_model", no_loading)
    manifest = write_manifest(tmp_path / "three.jsonl", ROWS[:3])
    output = tmp_path / "run"
    argv = ["--train", str(manifest), "--output", str(output), "--device", "cpu", "--no-progress"]
    assert main([*argv, "--eval-holdout", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"whisper-rope: error: --eval-holdout 3 keeps back every clip of {str(manifest)!r} (3 rows): hold out fewer, "
        "or give --eval"
    )
    assert not output.exists()  # refused before the output directory was claimed
    with pytest.raises(AssertionError, match="a model was loaded"):  # a holdout that leaves clips goes on to load
        main([*argv, "--eval-holdout", "2", "--batch-size", "1"])


def test_resume_refuses_another_variant_or_model_size(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    source = tmp_path / "source.pt"
    save_checkpoint(build_model(small_dims(), "rotary"), source)
    finetune(config=quick_config(tmp_path / "run", model=str(source), train=str(manifest), steps=1, save_every=1))
    common = [
        "--train",
        str(manifest),
        "--output",
        str(tmp_path / "run"),
        "--resume",
        "--batch-size",
        "2",
        "--no-progress",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    assert main(["--model", str(source), "--variant", "rotary/learned", *common]) == 2
    assert "trained as variant 'rotary/rotary', this run builds 'rotary/learned'" in capsys.readouterr().err
    bigger = tmp_path / "bigger.pt"
    save_checkpoint(build_model(small_dims(n_text_ctx=48), "rotary"), bigger)
    assert main(["--model", str(bigger), *common]) == 2
    assert "different model size (n_text_ctx differ" in capsys.readouterr().err
    # A fresh run must not mix its checkpoints into another run's directory.
    assert main(["--model", str(source), *common[:4], "--batch-size", "2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "holds a finished run of other settings (" in error and "--lr 0.001 there, 1e-05 now" in error
    assert error.strip().endswith("choose another --output, or pass --resume to continue its last step checkpoint")


# --------------------------------------------------------------------------------------------------------------------
# Distributed data parallel

DDP_SCRIPT = """
import shutil, sys
import torch.distributed as dist
from whisper_rope.cli.finetune import main

dist.init_process_group("gloo")  # finetune joins the existing group (two runs in one torchrun)
model, train, out = sys.argv[1:4]
common = ["--model", model, "--train", train, "--steps", "3", "--batch-size", "2", "--lr", "1e-3",
          "--warmup-steps", "0", "--num-workers", "0", "--no-progress", "--device", "cpu", "--log-every", "1",
          "--save-dtype", "float32"]  # weights compared to 1e-6 below
if main(common + ["--output", out + "/straight", "--save-every", "1", "--keep-last", "3"]):
    sys.exit(1)
if dist.get_rank() == 0:
    shutil.copytree(out + "/straight/step-0000001", out + "/resumed/step-0000001")
dist.barrier()
if main(common + ["--output", out + "/resumed", "--resume"]):
    sys.exit(1)
dist.destroy_process_group()
"""


def _run_launcher(command: list, env: dict) -> None:
    """Run a torch.distributed launcher to the end; on a hang kill its whole session (every worker process)."""
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-3000:]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    manifest = write_manifest(tmp_path / "four.jsonl", ROWS[:4])
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    save_checkpoint(build_model(small_dims(), "rotary"), source)
    script = tmp_path / "ddp_finetune.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(source),
        str(manifest),
        str(tmp_path / "ddp"),
    ]
    _run_launcher(command, env)

    single_config = quick_config(tmp_path / "single", model=str(source), train=str(manifest), steps=3)
    single = finetune(config=replace(single_config, save_dtype="float32"))
    ddp = tmp_path / "ddp" / "straight"
    # Each rank pads its clip only to its own length; masking makes that invisible up to rounding.
    assert max_difference(state_dict_of(ddp / MODEL_FILE), state_dict_of(single.output / MODEL_FILE)) < 1e-5
    single_losses = [r["loss"] for r in records(single.output, "train")]
    assert [r["loss"] for r in records(ddp, "train")] == pytest.approx(single_losses, rel=1e-5)
    assert records(ddp, "start")[0]["world_size"] == 2
    # Resuming under DDP from step 1 repeats the uninterrupted DDP run.
    resumed = state_dict_of(tmp_path / "ddp" / "resumed" / MODEL_FILE)
    assert max_difference(state_dict_of(ddp / MODEL_FILE), resumed) <= 1e-6


DDP_DISTILL_SCRIPT = """
import sys
from whisper_rope.cli.finetune import main

model, train, out, cache = sys.argv[1:5]
sys.exit(main(["--model", model, "--variant", "rotary/learned", "--train", train, "--steps", "2", "--batch-size", "2",
               "--lr", "1e-3", "--warmup-steps", "0", "--num-workers", "0", "--no-progress", "--device", "cpu",
               "--log-every", "1", "--distill-only", "--ce-weight", "0", "--distill-decoder-layers", "1",
               "--distill-encoder-weight", "1", "--teacher-cache", cache, "--output", out, "--save-dtype", "float32"]))
"""


def test_label_free_state_distillation_under_two_gloo_processes_matches_one_process(tmp_path):
    """Each rank fills its share of the teacher cache; every state term is normalised over the global batch."""
    manifest = write_manifest(tmp_path / "four.jsonl", ROWS[:4], text=False)
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    save_checkpoint(randomise_(build_model(small_dims(n_audio_ctx=1500), "whisper"), std=0.05), source)
    script = tmp_path / "ddp_distill.py"
    script.write_text(DDP_DISTILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    command += [str(source), str(manifest), str(tmp_path / "ddp"), str(tmp_path / "cache")]
    _run_launcher(command, env)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4  # every clip once, whichever rank filled it

    single = finetune(
        config=quick_config(
            tmp_path / "single",
            model=str(source),
            variant="rotary/learned",
            train=str(manifest),
            distill_only=True,
            ce_weight=0.0,
            distill_decoder_layers=1.0,
            distill_encoder_weight=1.0,
            teacher_cache=str(tmp_path / "cache"),
            save_dtype="float32",
        )
    )
    ddp = records(tmp_path / "ddp", "train")
    for key in ("total_loss", "decoder_layers", "encoder_output"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in records(single.output, "train")], rel=1e-4)
    assert (
        max_difference(state_dict_of(tmp_path / "ddp" / MODEL_FILE), state_dict_of(single.output / MODEL_FILE)) < 1e-5
    )


# --------------------------------------------------------------------------------------------------------------------
# Padding masks, policies, schedule


def test_a_clips_logits_and_loss_are_the_same_alone_and_zero_padded_in_a_batch(tmp_path):
    model = randomise_(build_model(small_dims(), "rotary"), std=0.05).eval()
    dataset = load_examples(write_manifest(tmp_path / "three.jsonl", ROWS[:3]), model, pad_30s=False)
    items = [dataset[i] for i in range(3)]
    collate = Collator(dataset.tokenizer(0).eot, padded_30s=False)
    batch = collate(items)
    assert len(set(batch.frames.tolist())) == 3  # three different lengths: two clips carry padding
    with torch.no_grad():
        together = model(batch.mel, batch.tokens, batch.n_frames)
        for row, item in enumerate(items):
            alone_batch = collate([item])
            alone = model(alone_batch.mel, alone_batch.tokens, alone_batch.n_frames)[0]
            n = len(item.tokens)
            assert torch.allclose(together[row, :n], alone, atol=1e-4), float((together[row, :n] - alone).abs().max())
            loss_alone = F.cross_entropy(alone, item.labels, ignore_index=IGNORE_INDEX)
            loss_batched = F.cross_entropy(together[row], batch.labels[row], ignore_index=IGNORE_INDEX)
            assert float(loss_batched) == pytest.approx(float(loss_alone), abs=1e-5)


def test_train_policies_choose_parameters_and_new_parameters_always_train():
    model = build_model(small_dims(), "rotary/learned-sinusoidal", gated_rotary=True)
    model.load_report = type("Report", (), {"initialised": ["decoder.positional_embedding"]})()
    names = set(select_trainable(model, "encoder"))
    assert all(n.startswith("encoder.") or n == "decoder.positional_embedding" for n in names)
    assert "decoder.positional_embedding" in names and "decoder.blocks.0.mlp.0.weight" not in names
    names = set(select_trainable(model, "decoder"))
    assert all(n.startswith("decoder.") or n.endswith("rotary_gate") for n in names)
    assert "encoder.blocks.0.attn.rotary_gate" in names and "encoder.blocks.0.mlp.0.weight" not in names
    positional = set(select_trainable(model, "positional"))
    assert "encoder.blocks.1.attn.query.weight" in positional and "decoder.blocks.0.cross_attn.value.bias" in positional
    assert "encoder.blocks.1.mlp.0.weight" not in positional and "decoder.token_embedding.weight" not in positional
    assert set(select_trainable(model, r"\.ln\.|ln_post")) >= {"decoder.ln.weight", "encoder.ln_post.bias"}
    everything = set(select_trainable(model, "all"))
    assert everything == {n for n, _ in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="selects no parameter"):
        select_trainable(build_model(small_dims(), "whisper"), "nothing_here")

    select_trainable(model, "decoder")
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    plain, decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim < 2 for p in plain["params"])
    # Frozen parameters are in the groups too (staged training unfreezes them); AdamW skips them while frozen.
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_the_positional_path_gets_its_own_learning_rate():
    model = build_model(small_dims(), "rotary+sinusoidal/learned", gated_rotary=True)
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01, lr_positional=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {names[id(p)] for g in optimizer.param_groups if g["lr"] == 1e-3 for p in g["params"]}
    assert "encoder.blocks.0.attn.query.weight" in fast and "decoder.blocks.1.attn.key.weight" in fast
    assert "encoder.blocks.0.attn.rotary_gate" in fast and "decoder.positional_embedding" in fast
    assert "encoder.blocks.0.attn.value.weight" not in fast and "decoder.blocks.0.cross_attn.query.weight" not in fast
    assert len(fast) == 2 * 2 * 3 + 2 + 1  # query weight/bias + key weight per block, gates, the decoder table


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, 4, 12, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, 4, 12, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 4, 12, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 4, 12, "linear") == pytest.approx(0.25)
    assert lr_factor(12, 4, 12, "cosine") == pytest.approx(0.0)
    assert lr_factor(0, 0, 10, "cosine") == 1.0


def test_cli_options_are_built_from_the_config_fields():
    parser = add_finetune_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--train",
            "t.jsonl",
            "--batch-size",
            "4",
            "--grad_accum",
            "3",
            "--distill-only",
            "--no-progress",
            "--resume",
            "--schedule",
            "linear",
            "-o",
            "out",
        ]
    )
    config = config_from_args(args)
    assert (config.train, config.batch_size, config.grad_accum, config.schedule) == ("t.jsonl", 4, 3, "linear")
    assert (config.distill_only, config.progress, config.resume, config.output) == (True, False, "", "out")
    defaults = config_from_args(parser.parse_args([]))
    assert defaults == FinetuneConfig()
    option_names = {a.dest for a in parser._actions if a.dest != "help"}
    assert option_names == {f for f in FinetuneConfig.__dataclass_fields__}
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule", "step"])
    with pytest.raises(ValueError, match="--train-policy '\\(' is neither"):
        config_from_args(parser.parse_args(["--train-policy", "("]))
    with pytest.raises(ValueError, match="--keep-last/--keep_last must be a whole number from 1 to 1000000000, got 0"):
        FinetuneConfig(keep_last=0).validate()


# --------------------------------------------------------------------------------------------------------------------
# Failure handling


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    model = build_model(small_dims(), "rotary")
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) >= 3 else output

    model.decoder.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 \(the last good checkpoint is .*step-0000002"):
        finetune(model, manifest, None, quick_config(tmp_path / "run", steps=5, save_every=1, keep_last=5))
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-0000002"
    weights = state_dict_of(latest / MODEL_FILE)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert torch.load(latest / STATE_FILE, weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / MODEL_FILE).exists()
    assert records(tmp_path / "run", "error")[0]["step"] == 3


KILL_SCRIPT = """
import sys, torch
from whisper.model import ModelDimensions
from whisper_rope import build_model
from whisper_rope.weights.loading import checkpoint_dict
from whisper_rope.training.state import latest_checkpoint, save_step_checkpoint

out = sys.argv[1]
dims = ModelDimensions(80, 24, 64, 4, 2, 51864, 32, 64, 4, 2)
model = build_model(dims, "rotary")
latest = latest_checkpoint(out)
step = int(latest.name.split("-")[1]) if latest else 0
while True:
    step += 1
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float(step))
    state = {"step": step, "moments": torch.full((4096, 4096), float(step))}  # 64 MB: writes dominate the loop
    save_step_checkpoint(out, step, checkpoint_dict(model), state, keep_last=2)
    print(step, flush=True)
"""


def test_sigkill_during_repeated_checkpoint_writes_never_leaves_an_unloadable_latest_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    output = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Measured: a writer that torch.saves straight into step-N/ leaves a truncated latest file in ~40% of kills.
    rng = random.Random(0)
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, str(script), str(output)], stdout=subprocess.PIPE, env=env)
        writer.stdout.readline()  # one checkpoint written: imports are over, writes are in full swing
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        latest = latest_checkpoint(output)
        model_file = torch.load(latest / MODEL_FILE, weights_only=True)
        state = torch.load(latest / STATE_FILE, weights_only=True)
        step = int(latest.name.split("-")[1])
        assert state["step"] == step and bool((state["moments"] == step).all())
        assert all(bool((t == step).all()) for k, t in model_file["model_state_dict"].items() if k.endswith("weight"))
        load_model(latest / MODEL_FILE, device="cpu")


# --------------------------------------------------------------------------------------------------------------------
# Self-distillation


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(build_model(small_dims(n_audio_ctx=1500), "whisper"), path)
    return path


def test_distillation_from_an_identical_teacher_has_zero_kl_and_encoder_distance(tmp_path, teacher_file):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    result = finetune(
        config=quick_config(
            tmp_path / "run",
            model=str(teacher_file),
            train=str(manifest),
            steps=1,
            distill=True,
            distill_encoder_weight=1.0,
        )
    )
    first = records(tmp_path / "run", "train")[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["encoder_output"] == pytest.approx(0.0, abs=1e-5)  # fp16 targets
    assert first["loss"] > 1.0  # the cross-entropy itself is far from zero for a random model
    assert records(tmp_path / "run", "start")[0]["unpadded"] is False  # a table encoder trains on 30-s windows
    assert result.steps == 1


def test_distill_only_trains_a_rotary_student_on_the_teachers_greedy_transcripts(tmp_path, teacher_file):
    manifest = write_manifest(tmp_path / "untranscribed.jsonl", ROWS[:2], text=False)
    teacher = load_model(teacher_file, variant="whisper", device="cpu")
    student = load_model(teacher_file, variant="rotary", device="cpu")
    dataset = load_examples(manifest, student, pad_30s=False, require_text=False, teacher_30s=True)
    cache = TeacherCache(tmp_path / "cache", teacher, TargetSpec(kinds=(), transcripts="teacher"))
    item = TeacherTargetsDataset(dataset, cache.fill(dataset, torch.device("cpu"), progress=False), "teacher")[0]
    greedy = teacher.decode(item.teacher_mel[None], DecodingOptions(language="en", without_timestamps=True, fp16=False))
    tokenizer = dataset.tokenizer(0)
    expected = list(tokenizer.sot_sequence_including_notimestamps) + greedy[0].tokens
    assert item.tokens.tolist() == expected
    assert item.labels.tolist() == [IGNORE_INDEX] * (len(expected) - len(greedy[0].tokens) - 1) + greedy[0].tokens + [
        tokenizer.eot
    ]

    result = finetune(
        student,
        manifest,
        None,
        quick_config(tmp_path / "run", model=str(teacher_file), steps=1, distill_only=True),
        teacher=teacher,
    )
    first = records(tmp_path / "run", "train")[0]
    assert first["kl"] > 0 and first["loss"] > 0
    assert load_model(result.model_path, device="cpu").variant == "rotary/rotary"


def test_gradient_checkpointing_gives_the_same_gradients_and_restores_the_blocks(tmp_path, monkeypatch):
    from whisper_rope.training.optim import gradient_checkpointing

    model = randomise_(build_model(small_dims(), "rotary"), std=0.05)
    dataset = load_examples(write_manifest(tmp_path / "two.jsonl", ROWS[:2]), model, pad_30s=False)
    batch = Collator(dataset.tokenizer(0).eot, padded_30s=False)([dataset[0], dataset[1]])

    def gradients():
        model.zero_grad()
        logits = model(batch.mel, batch.tokens, batch.n_frames)
        F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    with gradient_checkpointing(model):
        recomputed = gradients()
        with torch.no_grad():
            model(batch.mel, batch.tokens, batch.n_frames)  # no graph, nothing to checkpoint
    assert len(calls) == 4  # two encoder and two decoder blocks, in the gradient pass only
    assert max(float((plain[n] - recomputed[n]).abs().max()) for n in plain) < 1e-6
    blocks = list(model.encoder.blocks) + list(model.decoder.blocks)
    assert all("forward" not in vars(block) for block in blocks)


class _Payload:
    def __reduce__(self):
        return (print, ("a pickled program ran",))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: b"PK\x03\x04" + b"\x00" * 64, "truncated or not a PyTorch file"),
        (lambda state: [state["step"]], "is a list, expected a dict"),
        (lambda state: {k: v for k, v in state.items() if k != "rng"}, "has no valid 'rng' entry"),
        (lambda state: {**state, "optimizer": _Payload()}, "holds objects other than tensors and plain data"),
    ],
)
def test_a_damaged_or_hostile_training_state_is_refused_naming_the_file(tmp_path, damage, message, capsys):
    from whisper_rope.training.state import read_training_state

    state = {
        "step": 1,
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "sampler": {},
        "rng": {},
        "config": {},
        "variant": "rotary/rotary",
        "dims": {},
    }
    path = tmp_path / STATE_FILE
    damaged = damage(state)
    path.write_bytes(damaged) if isinstance(damaged, bytes) else torch.save(damaged, path)
    with pytest.raises(TrainingError, match=message) as raised:
        read_training_state(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert "a pickled program ran" not in capsys.readouterr().out


def test_a_resumed_run_sweeps_only_its_own_temporary_files_left_by_writes_cut_short(tmp_path):
    manifest = write_manifest(tmp_path / "two.jsonl", ROWS[:2])
    output = tmp_path / "run"
    finetune(build_model(small_dims(), "rotary"), manifest, None, quick_config(output, steps=1, save_every=1))
    best = output / "best"
    best.mkdir(exist_ok=True)
    strays = [output / ".model.pt.k1ll3d0q.tmp", best / ".model.pt.x_7abc12.tmp", best / ".metrics.json.0000abcd.tmp"]
    for stray in strays:
        stray.write_bytes(b"partial")
    (output / ".step-0000003.partial").mkdir()
    (output / ".notes.tmp").write_text("a file of the user's, not a temporary of ours\n")
    finetune(build_model(small_dims(), "rotary"), manifest, None, quick_config(output, steps=2, resume=str(output)))
    assert not any(p.exists() for p in strays) and not (output / ".step-0000003.partial").exists()
    assert (output / ".notes.tmp").read_text().startswith("a file of the user's")
