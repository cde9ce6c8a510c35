"""The modules that moved out of the 0.1 layout stay importable under their old names for one release, and every name
they offered is the very object of its new home (not a copy that could drift)."""

import importlib
import subprocess
import sys
import warnings

import pytest

import whisper_rope
from tests.conftest import FIXTURES, small_dims

# old module -> (new homes, names it offered that tests, benchmarks, README or users reach for)
MOVED = {
    "checkpoint": (
        ["weights.loading", "weights.format"],
        [
            "LoadReport",
            "adapt_state_dict",
            "build_model",
            "checkpoint_dict",
            "load_model",
            "read_checkpoint",
            "resolve_checkpoint",
            "save_checkpoint",
            "validate_checkpoint",
            "UPSTREAM_VARIANT",
        ],
    ),
    "train": (
        [
            "training.config",
            "training.loop",
            "training.command",
            "training.optim",
            "evaluation.evaluate",
            "training.state",
        ],
        [
            "FinetuneConfig",
            "FinetuneResult",
            "finetune",
            "main",
            "add_finetune_arguments",
            "config_from_args",
            "run_finetune_cli",
            "validation_metrics",
            "gradient_checkpointing",
            "select_trainable",
            "build_optimizer",
            "lr_factor",
            "latest_checkpoint",
            "save_step_checkpoint",
            "read_training_state",
            "MODEL_FILE",
            "STATE_FILE",
            "LOG_FILE",
            "CURVES_FILE",
            "POLICIES",
        ],
    ),
    "evaluate": (
        ["evaluation.evaluate", "evaluation.command"],
        [
            "EvaluationOptions",
            "EvaluationResult",
            "UtteranceResult",
            "evaluate",
            "score_texts",
            "main",
            "NORMALIZERS",
        ],
    ),
    "convert": (
        [
            "weights.convert",
            "weights.common",
            "weights.format",
            "weights.ctranslate2",
            "weights.huggingface",
            "weights.packages",
        ],
        [
            "convert",
            "ImportedCheckpoint",
            "InstalledModel",
            "cached_conversion",
            "find_installed_model",
            "installed_model_names",
            "is_ctranslate2_dir",
            "is_huggingface_dir",
            "read_ctranslate2",
            "read_huggingface",
            "resolve_cache_dir",
            "save_upstream",
            "upstream_shapes",
            "write_huggingface",
        ],
    ),
    "convert.common": (
        ["weights.common", "weights.format"],
        [
            "ImportedCheckpoint",
            "upstream_shapes",
            "check_dims",
            "check_state_dict",
            "alignment_mask",
            "alignment_pairs",
            "read_json_object",
            "refused_global",
            "DIM_KEYS",
            "UNSAFE_PICKLE",
        ],
    ),
    "convert.ctranslate2": (["weights.ctranslate2"], ["read_ctranslate2", "is_ctranslate2_dir"]),
    "convert.huggingface": (
        ["weights.huggingface"],
        ["read_huggingface", "write_huggingface", "is_huggingface_dir", "hf_name", "dims_to_config", "special_tokens"],
    ),
    "convert.packages": (
        ["weights.packages"],
        ["cached_conversion", "find_installed_model", "installed_model_names", "KNOWN_PACKAGES", "content_hash"],
    ),
    "batch": (["transcribe"], ["transcribe_many"]),
    "metrics": (["evaluation.metrics"], ["ErrorRates", "error_rates", "normalizer_for"]),
    "compare": (["evaluation.compare"], ["CompareConfig", "RunSpec", "compare", "run_compare_cli", "results_table"]),
    "transplant": (
        ["training.transplant"],
        ["TransplantSchedule", "apply_schedule", "finalize_transplant", "check_transplant_model", "TRANSPLANT_VARIANT"],
    ),
    "train_state": (
        ["training.state"],
        ["latest_checkpoint", "save_step_checkpoint", "read_training_state", "resolve_resume", "step_checkpoints"],
    ),
    "train_log": (["training.log"], ["TrainingLog", "plot_curves", "jsonable"]),
    "distributed": (["training.distributed"], ["DistributedContext", "from_environment"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_names_are_the_new_objects(old):
    homes, names = MOVED[old]
    module = importlib.import_module(f"whisper_rope.{old}")
    new = [importlib.import_module(f"whisper_rope.{home}") for home in homes]
    for name in names:
        owners = [home for home in new if name in vars(home)]
        assert owners, f"{name} has no new home among {homes}"
        assert getattr(module, name) is getattr(owners[0], name), f"whisper_rope.{old}.{name} is a copy"


def test_evaluate_stays_callable_after_its_module_is_imported():
    import whisper_rope.evaluate
    from whisper_rope.evaluation import evaluate as evaluation_module

    assert whisper_rope.evaluate.evaluate is evaluation_module.evaluate
    model = whisper_rope.build_model(small_dims(), "rotary")
    result = whisper_rope.evaluate(model, [(FIXTURES / "hello.flac", "hello")], progress=False)
    assert isinstance(result, evaluation_module.EvaluationResult)
    assert result.n_utterances == 1 and result.n_words == 1


@pytest.mark.parametrize("module, command", [("whisper_rope.train", "finetune"), ("whisper_rope.evaluate", "evaluate")])
def test_old_commands_run_without_runpy_warnings(module, command):
    """``python -m whisper_rope.train`` is ``whisper-rope finetune``: same usage, description and options."""
    completed = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "found in sys.modules" not in completed.stderr
    subcommand = subprocess.run(
        [sys.executable, "-m", "whisper_rope.cli", command, "--help"], capture_output=True, text=True, check=True
    )
    assert completed.stdout.startswith(f"usage: whisper-rope {command} ")
    assert completed.stdout == subcommand.stdout


def test_no_deprecated_module_is_imported_by_the_package():
    """The package itself uses only the new homes: importing it and its CLI loads no shim."""
    code = (
        "import sys, whisper_rope, whisper_rope.cli; "
        f"print(sorted(m for m in sys.modules if m in {sorted('whisper_rope.' + m for m in MOVED)!r}))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_version_is_recorded():
    assert whisper_rope.__version__ == importlib.import_module("whisper_rope.version").__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("whisper_rope.errors")
