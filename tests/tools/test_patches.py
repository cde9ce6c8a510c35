"""patches/: every preset as a unified diff against upstream whisper, applied and compared with whisper_rope."""

import contextlib
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import whisper
from whisper.model import disable_sdpa

import whisper_rope
from tests.conftest import randomise_, small_dims
from tools import patches

REPO = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO / "patches" / f"openai-whisper-{whisper.__version__}"
UPSTREAM_DIR = Path(whisper.__file__).resolve().parent
POSITIONAL = {"encoder.positional_embedding", "decoder.positional_embedding"}
#: The patched upstream computes whisper_rope's numbers with the same operations, so fp32 logits agree to rounding.
SAME_NUMBERS = dict(atol=1e-6, rtol=0)
UPSTREAM_NAMES = [
    "Whisper",
    "ModelDimensions",
    "MultiHeadAttention",
    "ResidualAttentionBlock",
    "AudioEncoder",
    "TextDecoder",
    "LayerNorm",
    "Linear",
    "Conv1d",
    "sinusoids",
    "disable_sdpa",
    "SDPA_AVAILABLE",
]


def _import_package(name: str, folder: Path) -> ModuleType:
    """Import the package in ``folder`` under the module name ``name`` (its relative imports follow)."""
    init = folder / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=patches.PATCHED_PRESETS)
def patched(request, tmp_path_factory):
    """A copy of the installed whisper package with one preset's patch applied, imported as whisper_patched_*.

    The copy sits at ``<root>/whisper`` like the package in site-packages, and the patch is applied from ``<root>``
    exactly as the README says: ``patch -p1 -F0`` (no fuzz).
    """
    preset = request.param
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(UPSTREAM_DIR, root / "whisper", ignore=shutil.ignore_patterns("__pycache__"))
    applied = subprocess.run(
        ["patch", "-p1", "-F0", "-i", str(PATCH_DIR / patches.patch_file_name(preset))],
        cwd=root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    # One name per copy: a second copy under the same name would pick up the first one's cached submodules.
    name = "whisper_patched_" + re.sub(r"\W", "_", preset) + "_" + root.name
    package = _import_package(name, root / "whisper") if applied.returncode == 0 else None
    yield SimpleNamespace(preset=preset, root=root, applied=applied, package=package)
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


@contextlib.contextmanager
def _attention_path(package: ModuleType, sdpa: bool):
    """SDPA (the default) or the explicit path, in both the patched package and upstream (whisper_rope's base)."""
    if sdpa:
        yield
    else:
        with disable_sdpa(), package.model.disable_sdpa():
            yield


def _pair(patched, dims):
    """The patched upstream model and whisper_rope's preset, holding the same random weights."""
    ours = whisper_rope.build_model(dims, patched.preset).eval()
    theirs = randomise_(patched.package.Whisper(dims)).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _decode_incrementally(model, tokens, audio, chunks):
    """Logits of ``tokens`` fed in ``chunks`` (start, end) through the model's own kv-cache hooks."""
    cache, hooks = model.install_kv_cache_hooks()
    try:
        return torch.cat([model.decoder(tokens[:, a:b], audio, kv_cache=cache) for a, b in chunks], dim=1)
    finally:
        for hook in hooks:
            hook.remove()


def test_patch_applies_exactly_with_p1_from_the_package_parent(patched):
    assert patched.applied.returncode == 0, patched.applied.stdout + patched.applied.stderr
    assert not [p.name for p in patched.root.rglob("*") if p.suffix in (".rej", ".orig")]
    assert "offset" not in patched.applied.stdout and "fuzz" not in patched.applied.stdout


def test_patched_upstream_keeps_public_names_and_checkpoint_keys(patched):
    dims = small_dims()
    for name in UPSTREAM_NAMES:
        assert hasattr(patched.package.model, name), name
    assert patched.package.Whisper is patched.package.model.Whisper
    assert patched.package.model.POSITIONAL_VARIANT == whisper_rope.parse_variant(patched.preset).name
    theirs, ours = _pair(patched, dims)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    upstream_keys = set(whisper.model.Whisper(dims).state_dict())
    assert upstream_keys - set(theirs.state_dict()) <= POSITIONAL
    assert set(theirs.state_dict()) <= upstream_keys


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "explicit"])
def test_full_forward_matches_whisper_rope(patched, sdpa):
    dims = small_dims()
    theirs, ours = _pair(patched, dims)
    tokens = torch.randint(0, 50000, (2, 9))
    # The table-free encoder takes any number of mel frames, not only 2 * n_audio_ctx.
    for n_frames in (2 * dims.n_audio_ctx, 30):
        mel = torch.randn(2, 80, n_frames)
        with _attention_path(patched.package, sdpa), torch.no_grad():
            torch.testing.assert_close(theirs(mel, tokens), ours(mel, tokens), **SAME_NUMBERS)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "explicit"])
def test_incremental_decoding_matches_whisper_rope(patched, sdpa):
    """A prompt, then one token at a time; and several tokens at once onto a non-empty cache."""
    dims = small_dims()
    theirs, ours = _pair(patched, dims)
    tokens = torch.randint(0, 50000, (2, 16))
    one_at_a_time = [(0, 5)] + [(i, i + 1) for i in range(5, 16)]
    chunked = [(0, 4), (4, 5), (5, 11), (11, 16)]
    with _attention_path(patched.package, sdpa), torch.no_grad():
        audio = theirs.embed_audio(torch.randn(2, 80, 2 * dims.n_audio_ctx))
        full = theirs.decoder(tokens, audio)
        for chunks in (one_at_a_time, chunked):
            cached = _decode_incrementally(theirs, tokens, audio, chunks)
            torch.testing.assert_close(cached, _decode_incrementally(ours, tokens, audio, chunks), **SAME_NUMBERS)
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_cross_attention_weights_for_word_timestamps_match(patched):
    """Upstream's timing.py reads qk from cross-attention under disable_sdpa(); the patch keeps that."""
    dims = small_dims()
    theirs, ours = _pair(patched, dims)
    mel, tokens = torch.randn(1, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (1, 7))
    weights = []
    for model in (theirs, ours):
        captured = []  # what timing.find_alignment's hooks collect: the qk of every cross-attention
        hooks = [
            block.cross_attn.register_forward_hook(lambda _, __, out: captured.append(out[-1]))
            for block in model.decoder.blocks
        ]
        with _attention_path(patched.package, sdpa=False), torch.no_grad():
            model(mel, tokens)
        for hook in hooks:
            hook.remove()
        weights.append(captured)
    assert len(weights[0]) == dims.n_text_layer and all(qk is not None for qk in weights[0])
    for theirs_qk, ours_qk in zip(*weights):
        torch.testing.assert_close(theirs_qk, ours_qk, **SAME_NUMBERS)


def test_upstream_decoding_gives_whisper_rope_tokens(patched):
    """The patched package's own decode (greedy on a batch, beam search with cache rearrangement)."""
    dims = small_dims()
    theirs, ours = _pair(patched, dims)
    mel = torch.randn(2, 80, 2 * dims.n_audio_ctx)
    for beam_size, clips in ((None, mel), (3, mel[0])):
        options = dict(language="en", beam_size=beam_size, sample_len=8, fp16=False)
        got = patched.package.decode(theirs, clips, patched.package.DecodingOptions(**options))
        expected = whisper.decode(ours, clips, whisper.DecodingOptions(**options))
        got, expected = (r if isinstance(r, list) else [r] for r in (got, expected))
        assert [r.tokens for r in got] == [r.tokens for r in expected]


def test_loading_an_upstream_checkpoint_follows_whisper_rope_rules(patched, tmp_path):
    dims = small_dims()
    upstream = randomise_(whisper.model.Whisper(dims)).eval()
    path = tmp_path / "upstream.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": upstream.state_dict()}, path)
    theirs = patched.package.load_model(str(path), device="cpu").eval()
    ours = whisper_rope.load_model(str(path), variant=patched.preset, device="cpu").eval()
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(theirs_state) == list(ours_state)
    for key, tensor in ours_state.items():
        assert torch.equal(theirs_state[key], tensor), key
    report = ours.load_report
    assert set(upstream.state_dict()) - set(theirs_state) == set(report.dropped) - set(report.initialised)
    for key in report.initialised:  # re-initialised rather than loaded: the learned-sinusoidal table
        assert torch.equal(theirs_state[key], whisper.model.sinusoids(dims.n_text_ctx, dims.n_text_state))
    mel, tokens = torch.randn(1, 80, 2 * dims.n_audio_ctx), torch.randint(0, 50000, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(mel, tokens), ours(mel, tokens), **SAME_NUMBERS)


def test_checkpoints_move_between_whisper_rope_and_the_patched_upstream(patched, tmp_path):
    """A fine-tuned whisper_rope checkpoint keeps every tensor (a learned-sinusoidal table too), and back."""
    dims = small_dims()
    ours = randomise_(whisper_rope.build_model(dims, patched.preset))
    whisper_rope.save_checkpoint(ours, tmp_path / "ours.pt")
    theirs = patched.package.load_model(str(tmp_path / "ours.pt"), device="cpu")
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())
    checkpoint = {
        "dims": asdict(theirs.dims),
        "model_state_dict": theirs.state_dict(),
        "variant": patched.package.model.POSITIONAL_VARIANT,
    }
    torch.save(checkpoint, tmp_path / "theirs.pt")
    back = whisper_rope.load_model(str(tmp_path / "theirs.pt"), device="cpu")
    assert back.variant == whisper_rope.parse_variant(patched.preset).name
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_committed_patches_equal_regenerated(tmp_path):
    expected = patches.render_patches(UPSTREAM_DIR)
    assert sorted(p.name for p in PATCH_DIR.glob("*.patch")) == sorted(expected)
    for name, text in expected.items():
        assert (PATCH_DIR / name).read_text() == text, f"{name} is stale: run python tools/patches.py regenerate"
    (tmp_path / "stale.patch").write_text("")
    written = patches.regenerate(UPSTREAM_DIR, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written) == sorted(expected)


def test_check_reports_every_patch_clean(capsys):
    results = patches.check_patches(PATCH_DIR, UPSTREAM_DIR)
    assert [(r.name, r.status) for r in results] == [(p.name, "clean") for p in sorted(PATCH_DIR.glob("*.patch"))]
    assert {r.preset for r in results} == set(patches.PATCHED_PRESETS)
    assert patches.main(["check", "--patches", str(PATCH_DIR)]) == 0
    assert capsys.readouterr().out.count("applies cleanly") == len(patches.PATCHED_PRESETS)


def test_an_upstream_change_fails_loudly(tmp_path):
    changed = tmp_path / "whisper"
    shutil.copytree(UPSTREAM_DIR, changed, ignore=shutil.ignore_patterns("__pycache__"))
    model_py = changed / "model.py"
    model_py.write_text(model_py.read_text().replace("qk = qk + mask[:n_ctx, :n_ctx]", "qk = qk + mask[:n_ctx]"))
    with pytest.raises(patches.PatchAnchorError, match=r"explicit path.*0 times, expected exactly once"):
        patches.render_patch("rotary", changed)
    assert {r.status for r in patches.check_patches(PATCH_DIR, changed)} == {"fails"}
    model_py.write_text("# a local change\n" + (UPSTREAM_DIR / "model.py").read_text())
    assert {r.status for r in patches.check_patches(PATCH_DIR, changed)} == {"shifted"}


def test_readme_lists_every_patch_with_its_preset():
    readme = (REPO / "patches" / "README.md").read_text()
    for preset in patches.PATCHED_PRESETS:
        assert f"`{patches.patch_file_name(preset)}` | `{preset}` |" in readme


@pytest.mark.parametrize("patched", ["rotary/learned-sinusoidal"], indirect=True)
def test_learned_sinusoidal_table_loads_by_source_variant(patched):
    """The one source-dependent rule: upstream's learned table does not carry over, a learned-sinusoidal one does."""
    dims = small_dims()
    state = randomise_(whisper.model.Whisper(dims)).state_dict()
    model = patched.package.Whisper(dims)
    model.load_state_dict(state, source_variant="sinusoidal/learned")
    sinusoids = whisper.model.sinusoids(dims.n_text_ctx, dims.n_text_state)
    assert torch.equal(model.decoder.positional_embedding.detach(), sinusoids)
    model.load_state_dict(state, source_variant="rotary/learned-sinusoidal")
    assert torch.equal(model.decoder.positional_embedding.detach(), state["decoder.positional_embedding"])
    with pytest.raises(ValueError, match="ENCODER/DECODER"):
        model.load_state_dict(state, source_variant="whisper")
