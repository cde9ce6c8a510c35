"""Checkpoint compatibility both ways.

whisper_rope reads every checkpoint upstream's ``whisper.load_model`` reads (extra entries are ignored or used,
never fatal); upstream cannot silently read a file of another positional variant as plain Whisper (it fails
loudly, while whisper_rope reads the file as the variant it is), files without that marker still load, and
``whisper``-variant files stay upstream checkpoints.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
import whisper
from whisper.model import ModelDimensions

import whisper_rope

from .commands import TOY_DIMS, checkpoint, save_model

#: Variants whose tensors carry exactly upstream's names, so that upstream would load them as plain Whisper.
UPSTREAM_NAMED = ["rotary+sinusoidal/learned", "sinusoidal/rotary+learned", "rotary+sinusoidal/rotary+learned"]
OTHER_VARIANTS = ["rotary", "rotary/sinusoidal", "rotary/learned-sinusoidal", "sinusoidal/sinusoidal",
                  "sinusoidal/learned-sinusoidal"]  # fmt: skip
DIM_NAMES = [f.name for f in fields(ModelDimensions)]


def _upstream_file(tmp_path: Path, **extra) -> Path:
    """A checkpoint as upstream writes it (dims and state dict only), plus ``extra`` top-level entries."""
    source = checkpoint(save_model(tmp_path / "source.pt"))
    path = tmp_path / "upstream.pt"
    torch.save({"dims": {k: source["dims"][k] for k in DIM_NAMES}, "model_state_dict": source["model_state_dict"],
                **extra}, path)  # fmt: skip
    return path


def test_alignment_heads_given_as_layer_head_pairs_are_read_and_used(tmp_path):
    path = _upstream_file(tmp_path, alignment_heads=[[1, 0], [1, 1]])
    whisper.load_model(str(path), device="cpu")  # upstream reads the file
    model = whisper_rope.load_model(path, device="cpu")
    assert model.alignment_heads.to_dense().tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("extra", [{"epoch": 3}, {"config": {"lr": 1e-5}}, {"alignment_heads": None}],
                         ids=["a number", "a dict", "None"])  # fmt: skip
def test_extra_top_level_entries_upstream_ignores_are_ignored(tmp_path, extra):
    path = _upstream_file(tmp_path, **extra)
    whisper.load_model(str(path), device="cpu")
    assert whisper_rope.load_model(path, device="cpu").variant == "sinusoidal/learned"


@pytest.mark.parametrize("variant", UPSTREAM_NAMED)
def test_upstream_refuses_a_variant_file_named_like_its_own_and_whisper_rope_reads_it(tmp_path, variant):
    path = save_model(tmp_path / "variant.pt", variant=variant)
    with pytest.raises(TypeError) as refused:  # ModelDimensions() got an unexpected keyword argument
        whisper.load_model(str(path), device="cpu")
    assert "whisper_rope" in str(refused.value), refused.value  # the loud failure says whose file it is
    model = whisper_rope.load_model(path, device="cpu")
    assert model.variant == whisper_rope.parse_variant(variant).name


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
def test_upstream_refuses_every_other_non_whisper_variant_file(tmp_path, variant):
    path = save_model(tmp_path / "variant.pt", variant=variant)
    with pytest.raises(TypeError, match="whisper_rope_variant"):  # before its tensors are even looked at
        whisper.load_model(str(path), device="cpu")
    assert whisper_rope.load_model(path, device="cpu").variant == whisper_rope.parse_variant(variant).name


@pytest.mark.parametrize("variant", UPSTREAM_NAMED + OTHER_VARIANTS)
def test_files_written_before_the_variant_marker_still_load(tmp_path, variant):
    """The layout of release 0.1.0: dims hold exactly upstream's ten fields, the variant sits beside them."""
    new = checkpoint(save_model(tmp_path / "new.pt", variant=variant))
    old = {**new, "dims": {k: new["dims"][k] for k in DIM_NAMES}, "whisper_rope_version": "0.1.0"}
    torch.save(old, tmp_path / "old.pt")
    model = whisper_rope.load_model(tmp_path / "old.pt", device="cpu")
    assert model.variant == whisper_rope.parse_variant(variant).name
    reference = whisper_rope.load_model(tmp_path / "new.pt", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_whisper_variant_files_stay_upstream_checkpoints_with_the_same_outputs(tmp_path):
    path = save_model(tmp_path / "whisper.pt", variant="whisper")
    ours = whisper_rope.load_model(path, device="cpu").eval()
    theirs = whisper.load_model(str(path), device="cpu").eval()
    mel = torch.randn(1, TOY_DIMS["n_mels"], 2 * TOY_DIMS["n_audio_ctx"])
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(ours(mel, tokens), theirs(mel, tokens), atol=1e-6)
