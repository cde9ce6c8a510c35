"""`whisper_rope.fs.outputs`: what a command may write (docs/reliability.md, "Outputs, honest runs, interrupts and
caches")."""

import pytest

from whisper_rope.fs.outputs import LOCK_FILE, OutputError, claim_directory, refuse_overlap, temporary_of


def _owns(name: str) -> bool:
    return name in ("model.pt", "log.jsonl")


def test_a_claimed_directory_is_locked_until_released_and_then_adopted_by_the_same_command(tmp_path):
    out = tmp_path / "run"
    claim = claim_directory(out, "finetune", "--output", _owns)
    assert claim.created and not claim.adopted
    (out / "model.pt").write_bytes(b"weights")
    with pytest.raises(OutputError, match="in use by another `whisper-rope finetune` run"):
        claim_directory(out, "finetune", "--output", _owns)
    with pytest.raises(OutputError, match="is the output of `whisper-rope finetune`, not of `whisper-rope compare`"):
        claim_directory(out, "compare", "--output", _owns)
    claim.release()
    with claim_directory(out, "finetune", "--output", _owns) as again:
        assert again.adopted
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "model.pt"]


def test_a_run_that_wrote_nothing_leaves_no_directory_and_an_empty_one_stays(tmp_path):
    claim_directory(tmp_path / "new", "finetune", "--output", _owns).release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    claim_directory(tmp_path / "empty", "finetune", "--output", _owns).release()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_foreign_files_are_refused_and_named_and_an_unmarked_run_is_adopted_only_when_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"weights")
    with pytest.raises(OutputError, match=r"already holds files this command did not write \(model.pt\)"):
        claim_directory(out, "finetune", "--output", _owns)
    claim_directory(out, "finetune", "--output", _owns, adopt_unmarked=True).release()
    (out / "thesis.tex").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match=r"\(thesis.tex\)"):
        claim_directory(other, "finetune", "--output", _owns, adopt_unmarked=True)
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]


def test_an_output_that_is_or_holds_an_input_is_refused_through_symlinks(tmp_path):
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "set.jsonl"
    manifest.write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(OutputError, match="holds the --data"):
        refuse_overlap(tmp_path / "link", {"--data": manifest}, "--output")
    with pytest.raises(OutputError, match="is the --data"):
        refuse_overlap(tmp_path / "link" / "set.jsonl", {"--data": manifest}, "--output")
    refuse_overlap(tmp_path / "data" / "set.json", {"--data": manifest, "--model": "tiny.en"}, "--output")


def test_only_the_temporaries_of_our_own_atomic_writes_are_recognised():
    assert temporary_of(".model.pt.a1b2_c3d.tmp", ["model.pt"])
    assert not temporary_of(".model.pt.k1ll3d.tmp", ["model.pt"])  # not mkstemp's 8 characters
    assert not temporary_of(".notes.abcdefgh.tmp", ["model.pt"])
    assert not temporary_of("model.pt", ["model.pt"])
