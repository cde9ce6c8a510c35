"""One reader and one validator for every checkpoint: our .pt files, upstream's, the Hugging Face and CTranslate2
importers, the Hugging Face exporter and the training state all refuse the same fault in the same words."""

import os

import pytest
import torch

import whisper_rope
from tests.convert_helpers import SMALL_DIMS, random_state_dict, write_model
from whisper_rope.errors import CheckpointError, ModelNotFoundError, TrainingError
from whisper_rope.training.state import read_training_state
from whisper_rope.weights.convert import convert
from whisper_rope.weights.ctranslate2 import read_ctranslate2
from whisper_rope.weights.format import check_dims, check_state_dict, load_pt, read_checkpoint
from whisper_rope.weights.huggingface import read_huggingface, write_huggingface

SPLIT_HEADS = "n_audio_head 3 does not divide n_audio_state 16"


class Payload:
    """Unpickling this would run ``os.system``."""

    def __reduce__(self):
        return os.system, ("exit 0",)


def _upstream_file(tmp_path, dims=SMALL_DIMS, state=None):
    path = tmp_path / "upstream.pt"
    torch.save({"dims": dict(dims), "model_state_dict": state or random_state_dict(SMALL_DIMS)}, path)
    return path


def test_dims_whose_heads_do_not_split_the_width_are_refused_alike_everywhere(tmp_path):
    bad = {**SMALL_DIMS, "n_audio_head": 3}
    refusals = []
    for attempt in (
        lambda: whisper_rope.load_model(_upstream_file(tmp_path, bad), device="cpu"),
        lambda: convert(_upstream_file(tmp_path, bad), tmp_path / "hf"),
        lambda: write_huggingface(bad, random_state_dict(SMALL_DIMS), tmp_path / "hf2"),
        lambda: check_dims(bad, "dims"),
    ):
        with pytest.raises(CheckpointError) as refused:
            attempt()
        refusals.append(str(refused.value))
    assert all(SPLIT_HEADS in message for message in refusals), refusals
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("value", [True, 8.0, "8", 0, -8])
def test_a_dim_that_is_not_a_positive_integer_is_named(value):
    with pytest.raises(CheckpointError, match=rf"src dims: n_mels is {value!r}, expected a positive integer"):
        check_dims({**SMALL_DIMS, "n_mels": value}, "src")


def test_dims_with_missing_or_extra_fields_name_the_difference():
    with pytest.raises(CheckpointError, match=r"differ in \['n_experts', 'n_vocab'\]"):
        check_dims({**{k: v for k, v in SMALL_DIMS.items() if k != "n_vocab"}, "n_experts": 4}, "src")


def test_layer_counts_are_checked_before_names_are_built_for_them():
    """A state dict of 2 layers with dims claiming a million is refused at once, by the layer count."""
    with pytest.raises(CheckpointError, match=r"dims say 1000000 decoder layers, its tensors hold 2"):
        check_state_dict(random_state_dict(SMALL_DIMS), {**SMALL_DIMS, "n_text_layer": 10**6}, "src")


def test_complete_checks_require_exactly_upstreams_tensors_and_partial_ones_leave_them_to_adaptation():
    state = random_state_dict(SMALL_DIMS)
    del state["encoder.positional_embedding"]
    check_state_dict(state, SMALL_DIMS, "ours", complete=False)
    with pytest.raises(CheckpointError, match=r"lacks tensor 'encoder.positional_embedding' \(and 0 more\)"):
        check_state_dict(state, SMALL_DIMS, "theirs")
    extra = {**random_state_dict(SMALL_DIMS), "decoder.extra": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"has tensor 'decoder.extra', which upstream Whisper does not have"):
        check_state_dict(extra, SMALL_DIMS, "theirs")


def test_a_wrong_shape_reads_the_same_from_our_reader_and_the_importers(tmp_path):
    state = random_state_dict(SMALL_DIMS)
    state["decoder.ln.weight"] = torch.zeros(7)
    expected = r"tensor 'decoder.ln.weight' has shape \(7,\), the model's dims expect \(16,\)"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(_upstream_file(tmp_path, state=state))
    with pytest.raises(CheckpointError, match=expected):
        write_huggingface(SMALL_DIMS, state, tmp_path / "hf")


def test_the_importers_check_their_result_with_the_same_validator(tmp_path):
    """A CTranslate2 model and a Hugging Face directory read back what was written, through check_dims."""
    state = random_state_dict(SMALL_DIMS)
    write_model(tmp_path / "ct2", SMALL_DIMS)
    assert read_ctranslate2(tmp_path / "ct2").dims == SMALL_DIMS
    hf = write_huggingface(SMALL_DIMS, state, tmp_path / "hf")
    assert read_huggingface(hf).dims == SMALL_DIMS


def test_every_pickle_reader_refuses_a_payload_in_the_same_words(tmp_path):
    hf = write_huggingface(SMALL_DIMS, random_state_dict(SMALL_DIMS), tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    torch.save({"model.encoder.conv1.weight": Payload()}, hf / "pytorch_model.bin")
    evil = tmp_path / "evil.pt"
    torch.save({"dims": SMALL_DIMS, "model_state_dict": {}, "rotary": Payload()}, evil)
    messages = []
    for attempt, error in (
        (lambda: read_checkpoint(evil), CheckpointError),
        (lambda: read_huggingface(hf), CheckpointError),
        (lambda: read_training_state(evil), TrainingError),
        (lambda: load_pt(evil.read_bytes(), "these bytes"), CheckpointError),
    ):
        with pytest.raises(error) as refused:
            attempt()
        messages.append(str(refused.value))
    for message in messages:
        assert "cannot be loaded safely" in message and "(Unsupported global posix.system)" in message, message


def test_a_missing_file_and_a_directory_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="checkpoint 'nowhere.pt' does not exist"):
        read_checkpoint("nowhere.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a .pt file"):
        read_checkpoint(tmp_path)
