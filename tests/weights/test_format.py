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
from whisper_rope.weights.format import (
    MAX_UNBACKED_CTX,
    VARIANT_MARKER,
    check_dims,
    check_state_dict,
    check_storage,
    load_pt,
    read_checkpoint,
    validate_checkpoint,
)
from whisper_rope.weights.huggingface import read_huggingface, write_huggingface
from whisper_rope.weights.loading import marked_dims

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
    with pytest.raises(CheckpointError, match=r"dims say 1000000 decoder layers \(n_text_layer\), its tensors hold 2"):
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


# ----------------------------------------------------------------------------------------------------------------
# Every claim bounded

EMBED = "decoder.token_embedding.weight"


@pytest.mark.parametrize(
    "view",
    [lambda t: t.t().contiguous().t(), lambda t: torch.cat([t, t], 1)[:, : t.shape[1]], lambda t: t.clone()[1:][:0]],
    ids=["transposed", "column slice", "empty slice"],
)
def test_dense_views_of_a_storage_pass_the_storage_check(view):
    state = random_state_dict(SMALL_DIMS)
    tensor = view(state[EMBED])
    check_storage({EMBED: tensor}, "src")


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: torch.zeros(1, 16).expand(10**6, -1), (10**6, 16)),
        (lambda: torch.randn(100).as_strided((90, 8), (1, 1)), (90, 8)),
        (lambda: torch.randn(4, 1, 8).expand(4, 3, 8), (4, 3, 8)),
    ],
    ids=["expanded", "overlapping", "expanded in the middle"],
)
def test_a_tensor_claiming_more_elements_than_its_storage_holds_is_refused(make, shape):
    with pytest.raises(CheckpointError) as refused:
        check_storage({EMBED: make()}, "src")
    assert f"src: tensor {EMBED!r} claims shape {shape}" in str(refused.value)
    assert "expected a dense tensor" in str(refused.value)


def test_two_tensors_sharing_elements_are_refused_unless_sharing_is_allowed():
    base = torch.randn(8, 16)
    state = {"a": base, "b": base[4:], "c": torch.randn(3)}
    with pytest.raises(CheckpointError, match=r"src: tensors 'a' and 'b' share elements"):
        check_storage(state, "src")
    check_storage(state, "src", shared=True)
    check_storage({"a": base[:4], "b": base[4:]}, "src")  # halves of one storage, each its own elements


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_their_count(value):
    state = random_state_dict(SMALL_DIMS)
    state["decoder.ln.bias"][:2] = value
    with pytest.raises(CheckpointError, match=r"src: tensor 'decoder.ln.bias' holds 2 NaN or infinite values"):
        check_state_dict(state, SMALL_DIMS, "src")


@pytest.mark.parametrize("key, table", [("n_audio_ctx", "encoder.positional_embedding"),
                                        ("n_text_ctx", "decoder.positional_embedding")])  # fmt: skip
def test_a_context_length_no_table_backs_is_capped(key, table):
    state = random_state_dict(SMALL_DIMS)
    del state[table]
    check_state_dict(state, {**SMALL_DIMS, key: MAX_UNBACKED_CTX[key]}, "src", complete=False)
    with pytest.raises(CheckpointError, match=rf"src dims: {key} is {MAX_UNBACKED_CTX[key] + 1}, but no {table}"):
        check_state_dict(state, {**SMALL_DIMS, key: MAX_UNBACKED_CTX[key] + 1}, "src", complete=False)


def test_a_missing_tensor_that_backs_a_dim_is_refused_even_when_adaptation_fills_the_rest():
    state = random_state_dict(SMALL_DIMS)
    del state[EMBED]
    with pytest.raises(CheckpointError, match=rf"src lacks tensor {EMBED!r} \(and 0 more\)"):
        check_state_dict(state, {**SMALL_DIMS, "n_vocab": 10**9}, "src", complete=False)


# ----------------------------------------------------------------------------------------------------------------
# The variant marker and the entries upstream ignores


def _ours(variant, **extra):
    return {"dims": marked_dims(SMALL_DIMS, variant), "model_state_dict": random_state_dict(SMALL_DIMS),
            "variant": whisper_rope.parse_variant(variant).name, **extra}  # fmt: skip


def test_the_marker_is_stored_for_every_variant_but_upstreams_and_read_back_as_the_variant():
    assert marked_dims(SMALL_DIMS, "whisper") == SMALL_DIMS
    assert marked_dims(SMALL_DIMS, "sinusoidal/learned") == SMALL_DIMS
    assert marked_dims(SMALL_DIMS, "rotary")[VARIANT_MARKER] == "rotary/rotary"
    checked = validate_checkpoint(_ours("rotary+sinusoidal/learned"), "f")
    assert checked["dims"] == SMALL_DIMS and checked["variant"] == "rotary+sinusoidal/learned"
    unnamed = _ours("rotary")
    del unnamed["variant"]
    assert validate_checkpoint(unnamed, "f")["variant"] == "rotary/rotary"  # the marker alone names it


TWO = r"names two variants: 'variant' 'rotary/rotary', whisper_rope_variant "


@pytest.mark.parametrize(
    "marker, expected",
    [(7, r"non-string dims' 'whisper_rope_variant': 7"), ("nope", TWO + "'nope'"),
     ("rotary/sinusoidal", TWO + "'rotary/sinusoidal'")],
)  # fmt: skip
def test_a_marker_that_is_no_variant_or_disagrees_with_the_variant_is_refused(marker, expected):
    checkpoint = _ours("rotary")
    checkpoint["dims"][VARIANT_MARKER] = marker
    with pytest.raises(CheckpointError, match=rf"checkpoint 'f' .*{expected}"):
        validate_checkpoint(checkpoint, "f")


def test_alignment_heads_as_layer_head_pairs_become_the_mask_and_bad_pairs_are_named():
    layers, heads = SMALL_DIMS["n_text_layer"], SMALL_DIMS["n_text_head"]
    checked = validate_checkpoint(_ours("whisper", alignment_heads=[[layers - 1, heads - 1]]), "f")
    assert checked["alignment_heads"].tolist()[-1][-1] and int(checked["alignment_heads"].sum()) == 1
    with pytest.raises(CheckpointError, match=rf"alignment head \[{layers}, 0\] is not a \[layer, head\] pair"):
        validate_checkpoint(_ours("whisper", alignment_heads=[[layers, 0]]), "f")


def test_rotary_options_of_a_later_version_are_left_alone_and_the_margin_is_bounded_by_the_context():
    validate_checkpoint(_ours("rotary", rotary={"theta": 500, "new_option": "x"}), "f")
    n_ctx = SMALL_DIMS["n_audio_ctx"]
    with pytest.raises(
        CheckpointError, match=rf"rotary.unpadded_margin is {n_ctx + 1}, expected an integer in 0..{n_ctx}"
    ):
        validate_checkpoint(_ours("rotary", rotary={"unpadded_margin": n_ctx + 1}), "f")


@pytest.mark.parametrize("penalty", [-1.0, 21, float("inf"), "1", None])
def test_a_stored_end_of_text_penalty_outside_its_range_is_refused_naming_it(penalty):
    validate_checkpoint(_ours("whisper", rotary={"eot_penalty": 1.5}), "f")
    with pytest.raises(
        CheckpointError, match=r"'f': rotary.eot_penalty is .*, expected a finite number from 0 to 20 nats"
    ):
        validate_checkpoint(_ours("whisper", rotary={"eot_penalty": penalty}), "f")
