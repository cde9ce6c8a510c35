"""The presets as unified diffs against upstream ``whisper/model.py``, for users who vendor openai-whisper.

    python tools/patches.py regenerate [--upstream DIR] [--out DIR]
    python tools/patches.py check [--upstream DIR] [--patches DIR]

``regenerate`` rebuilds one patch per preset (other than ``whisper``) from an upstream ``whisper`` package folder
(default: the installed one) by applying anchored source edits. Every anchor must occur exactly once, so an upstream
change fails loudly instead of yielding a subtly wrong patch. ``check`` tells, per patch, whether it still applies
exactly (no fuzz, no shifted lines) to the installed upstream, with GNU ``patch --dry-run -p1 -F0`` in a temporary
copy. tests/tools/test_patches.py applies every patch and compares the patched model with `whisper_rope.build_model`.

Patch paths are ``a/whisper/model.py`` / ``b/whisper/model.py``: ``patch -p1`` applies them from the root of an
unpacked openai-whisper source tree and from the site-packages directory holding the installed ``whisper`` package.
"""

import argparse
import difflib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from whisper_rope.errors import WhisperRopeError
from whisper_rope.variants import PRESETS, UPSTREAM_VARIANT, Variant, parse_variant

#: Presets that have a patch: all but upstream itself.
PATCHED_PRESETS: List[str] = [preset for preset in PRESETS if preset != "whisper"]

#: The repository this tool belongs to (its patches/ folder is the default output).
REPOSITORY = Path(__file__).resolve().parents[1]

#: Where upstream's files sit below the root of a source tree or a site-packages directory.
PACKAGE = "whisper"


class PatchAnchorError(WhisperRopeError, ValueError):
    """An upstream source text that a patch edit anchors on is missing or ambiguous: upstream changed."""


@dataclass(frozen=True)
class SourceEdit:
    """Replace ``anchor``, which must occur exactly once in upstream's ``file``, with ``replacement``.

    file: relative to the package folder (``model.py``); purpose: what the edit does, named in errors.
    """

    file: str
    purpose: str
    anchor: str
    replacement: str


@dataclass(frozen=True)
class PatchStatus:
    """What ``check`` found for one patch file. status: ``clean``, ``shifted``, ``fails`` or ``missing``."""

    name: str
    preset: Optional[str]
    status: str
    detail: str = ""

    @property
    def clean(self) -> bool:
        return self.status == "clean"


def patch_file_name(preset: str) -> str:
    """Filesystem-safe file name of a preset's patch: ``rotary/sinusoidal`` -> ``rotary__sinusoidal.patch``."""
    return preset.replace("/", "__") + ".patch"


# --- the edits --------------------------------------------------------------------------------------------------
# Replacement code follows upstream's own style (black, 88 columns), so that the patched file reads like upstream's.

_SDPA_IMPORT = """\
    scaled_dot_product_attention = None
    SDPA_AVAILABLE = False
"""


def _constants(variant: Variant) -> SourceEdit:
    return SourceEdit(
        "model.py",
        "the variant and RoPE constants",
        _SDPA_IMPORT,
        _SDPA_IMPORT
        + f"""
# this patched copy's positional variant, in whisper_rope's ENCODER/DECODER notation
POSITIONAL_VARIANT = "{variant.name}"
ROTARY_THETA = 10000.0
""",
    )


_SINUSOIDS_RETURN = """\
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)
"""

_ROTARY_FUNCTIONS = SourceEdit(
    "model.py",
    "the RoPE functions after sinusoids()",
    _SINUSOIDS_RETURN,
    _SINUSOIDS_RETURN
    + '''

def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """
    Rotate pair i of the last dimension's halves, (x1[i], x2[i]), by the angles of
    cos/sin (half-width tables): (x1 cos - x2 sin, x2 cos + x1 sin).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat(
        (torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)),
        dim=-1,
    )


def rotary_tables(
    n_ctx: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> Tuple[Tensor, Tensor]:
    """
    RoPE cos and sin, each (n_ctx, head_dim // 2), for positions 0 .. n_ctx - 1: pair i of
    the halves, (x1[i], x2[i]), turns by position * ROTARY_THETA ** (-2 i / head_dim).
    Angles are computed in fp32, then cast (fp16 holds no position above 2048 exactly).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = ROTARY_THETA ** (-exponents / head_dim)
    positions = torch.arange(n_ctx, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)
''',
)

_ATTENTION_INIT = SourceEdit(
    "model.py",
    "the rotary switch of MultiHeadAttention",
    """\
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
""",
    """\
    def __init__(self, n_state: int, n_head: int, rotary: bool = False):
        super().__init__()
        if rotary and (n_state // n_head) % 2:
            raise ValueError(
                f"RoPE needs an even head dimension, got {n_state // n_head}"
            )
        self.n_head = n_head
        # RoPE on queries and keys, for self-attention only
        self.rotary = rotary
""",
)

_ATTENTION_ROTATION = SourceEdit(
    "model.py",
    "RoPE and the cache-aligned causal mask in MultiHeadAttention.qkv_attention (SDPA path)",
    """\
        n_batch, n_ctx, n_state = q.shape
        scale = (n_state // self.n_head) ** -0.25
        q = q.view(*q.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        k = k.view(*k.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        v = v.view(*v.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)

        if SDPA_AVAILABLE and MultiHeadAttention.use_sdpa:
            a = scaled_dot_product_attention(
                q, k, v, is_causal=mask is not None and n_ctx > 1
            )
""",
    """\
        n_batch, n_ctx, n_state = q.shape
        # the kv-cache hooks prepend cached keys: k holds the raw key projections
        # of positions 0 .. n_k - 1, and the n_ctx queries are the last of them
        n_k = k.shape[1]
        scale = (n_state // self.n_head) ** -0.25
        q = q.view(*q.shape[:2], self.n_head, -1)
        k = k.view(*k.shape[:2], self.n_head, -1)
        if self.rotary:
            # rotated after the cache, so that every cached key keeps its own position;
            # per head before the heads move to dim 1, so that q @ k sees whisper_rope's
            # memory layout (a matmul sums in another order on another layout)
            cos, sin = rotary_tables(n_k, q.shape[-1], q.device, q.dtype)
            q = apply_rotary(q, cos[n_k - n_ctx :, None], sin[n_k - n_ctx :, None])
            k = apply_rotary(k, cos[:, None], sin[:, None])
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 1, 3)
        v = v.view(*v.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)

        if SDPA_AVAILABLE and MultiHeadAttention.use_sdpa:
            if mask is not None and 1 < n_ctx < n_k:
                # several queries onto a non-empty cache: is_causal would align the mask
                # top-left, so pass the causal rows of the queries' own positions
                a = scaled_dot_product_attention(
                    q, k, v, attn_mask=mask[n_k - n_ctx : n_k, :n_k] == 0
                )
            else:
                a = scaled_dot_product_attention(
                    q, k, v, is_causal=mask is not None and n_ctx > 1
                )
""",
)

_ATTENTION_EXPLICIT_MASK = SourceEdit(
    "model.py",
    "the cache-aligned causal mask in MultiHeadAttention.qkv_attention (explicit path)",
    """\
                qk = qk + mask[:n_ctx, :n_ctx]
""",
    """\
                qk = qk + mask[n_k - n_ctx : n_k, :n_k]
""",
)

_BLOCK_INIT = SourceEdit(
    "model.py",
    "the rotary switch of ResidualAttentionBlock",
    """\
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()

        self.attn = MultiHeadAttention(n_state, n_head)
""",
    """\
    def __init__(
        self,
        n_state: int,
        n_head: int,
        cross_attention: bool = False,
        rotary: bool = False,
    ):
        super().__init__()

        self.attn = MultiHeadAttention(n_state, n_head, rotary=rotary)
""",
)


def _drop_on_load(purpose: str, after: str, reason: str) -> SourceEdit:
    """A module that has no ``positional_embedding`` in its state dict ignores the one of upstream's checkpoints."""
    return SourceEdit(
        "model.py",
        purpose,
        after,
        after
        + f"""
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # {reason}
        state_dict.pop(prefix + "positional_embedding", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
""",
    )


_ROTARY_ENCODER = [
    SourceEdit(
        "model.py",
        "the encoder without a positional table",
        """\
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
""",
        """\
        # no positional table (n_ctx is unused): positions enter through RoPE in every
        # self-attention, so any number of mel frames is accepted
""",
    ),
    SourceEdit(
        "model.py",
        "the encoder's rotary blocks",
        """\
            [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
""",
        """\
            [
                ResidualAttentionBlock(n_state, n_head, rotary=True)
                for _ in range(n_layer)
            ]
""",
    ),
    _drop_on_load(
        "dropping encoder.positional_embedding on load",
        """\
        self.ln_post = LayerNorm(n_state)
""",
        "upstream checkpoints hold the sinusoid table this encoder replaced by RoPE",
    ),
    SourceEdit(
        "model.py",
        "the encoder docstring (any mel length)",
        """\
        x : torch.Tensor, shape = (batch_size, n_mels, n_ctx)
            the mel spectrogram of the audio
""",
        """\
        x : torch.Tensor, shape = (batch_size, n_mels, n_frames)
            the mel spectrogram of the audio, any number of frames
""",
    ),
    SourceEdit(
        "model.py",
        "the encoder forward without the table",
        """\
        x = x.permute(0, 2, 1)

        assert x.shape[1:] == self.positional_embedding.shape, "incorrect audio shape"
        x = (x + self.positional_embedding).to(x.dtype)

""",
        """\
        x = x.permute(0, 2, 1)

""",
    ),
]

_DECODER_TABLE_ANCHOR = """\
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
"""

#: Decoder table kind -> how the decoder builds it.
_DECODER_TABLES: Dict[Optional[str], str] = {
    None: """\
        # no positional table: positions enter through RoPE in every self-attention
""",
    "sinusoidal": """\
        # fixed sinusoids, not trained: a non-persistent buffer, not in the state dict
        self.register_buffer(
            "positional_embedding", sinusoids(n_ctx, n_state), persistent=False
        )
""",
    "learned-sinusoidal": """\
        # trainable, initialised with sinusoids (upstream's learned table is not loaded)
        self.positional_embedding = nn.Parameter(sinusoids(n_ctx, n_state))
""",
}

_DECODER_ROTARY_BLOCKS = SourceEdit(
    "model.py",
    "the decoder's rotary blocks",
    """\
                ResidualAttentionBlock(n_state, n_head, cross_attention=True)
""",
    """\
                ResidualAttentionBlock(
                    n_state, n_head, cross_attention=True, rotary=True
                )
""",
)

_DECODER_WITHOUT_TABLE_FORWARD = SourceEdit(
    "model.py",
    "the decoder forward without a table",
    """\
        offset = next(iter(kv_cache.values())).shape[1] if kv_cache else 0
        x = (
            self.token_embedding(x)
            + self.positional_embedding[offset : offset + x.shape[-1]]
        )
""",
    """\
        # positions enter in self-attention, counted from the kv-cache length
        x = self.token_embedding(x)
""",
)

_LEARNED_SINUSOIDAL_LOAD = [
    SourceEdit(
        "model.py",
        "Whisper.load_state_dict with the source variant",
        """\
        self.register_buffer("alignment_heads", all_heads.to_sparse(), persistent=False)
""",
        """\
        self.register_buffer("alignment_heads", all_heads.to_sparse(), persistent=False)

    def load_state_dict(self, state_dict, *args, source_variant=None, **kwargs):
        \"\"\"
        source_variant : str, optional
            the positional variant the state dict comes from, in whisper_rope's
            ENCODER/DECODER notation: upstream Whisper is "sinusoidal/learned"; None
            means POSITIONAL_VARIANT. The decoder's table is re-initialised with
            sinusoids unless the source decoder had a learned-sinusoidal table too.
        \"\"\"
        if source_variant is not None:
            if source_variant.count("/") != 1:
                raise ValueError(
                    "source_variant must be written ENCODER/DECODER (upstream: "
                    f"'sinusoidal/learned'), got {source_variant!r}"
                )
            if "learned-sinusoidal" not in source_variant.split("/")[1].split("+"):
                table = sinusoids(self.dims.n_text_ctx, self.dims.n_text_state)
                state_dict = {**state_dict, "decoder.positional_embedding": table}
        return super().load_state_dict(state_dict, *args, **kwargs)
""",
    ),
    SourceEdit(
        "__init__.py",
        "load_model passing the checkpoint's variant",
        """\
    model.load_state_dict(checkpoint["model_state_dict"])
""",
        f"""\
    # checkpoints without a "variant" entry are upstream's
    variant = checkpoint.get("variant", "{UPSTREAM_VARIANT}")
    model.load_state_dict(checkpoint["model_state_dict"], source_variant=variant)
""",
    ),
]


#: Decoder schemes that have a recipe (every preset's); the encoder of every preset is ``rotary``.
_PATCHED_DECODERS = ("rotary", "sinusoidal", "rotary+sinusoidal", "learned-sinusoidal")


def _decoder_drops_table_on_load(reason: str) -> SourceEdit:
    return _drop_on_load(
        "dropping decoder.positional_embedding on load",
        """\
        self.register_buffer("mask", mask, persistent=False)
""",
        f"upstream's learned table does not carry over: {reason}",
    )


#: whisper_rope writes ``whisper_rope_variant`` into the dims of every variant but upstream's (so that unpatched
#: upstream refuses such a file loudly); a patched package reads it like whisper_rope.
_MARKED_DIMS = SourceEdit(
    "__init__.py",
    "load_model reading the dims of a whisper_rope checkpoint",
    """\
    dims = ModelDimensions(**checkpoint["dims"])
""",
    """\
    # whisper_rope marks the dims of every variant but upstream's, so that unpatched upstream refuses them
    dims = ModelDimensions(**{k: v for k, v in checkpoint["dims"].items() if k != "whisper_rope_variant"})
""",
)


def edits_for(preset: str) -> List[SourceEdit]:
    """The source edits that turn upstream's files into ``preset``, in order."""
    variant = parse_variant(preset)
    if variant.encoder.name != "rotary" or variant.decoder.name not in _PATCHED_DECODERS:
        raise WhisperRopeError(
            f"no patch recipe for variant {variant.name!r}; patches exist for the presets {', '.join(PATCHED_PRESETS)}"
        )
    table = variant.decoder.table
    edits = [_constants(variant), _ROTARY_FUNCTIONS, _ATTENTION_INIT, _ATTENTION_ROTATION, _ATTENTION_EXPLICIT_MASK]
    edits += [_BLOCK_INIT, *_ROTARY_ENCODER, _MARKED_DIMS]
    edits.append(SourceEdit("model.py", "the decoder's table", _DECODER_TABLE_ANCHOR, _DECODER_TABLES[table]))
    if variant.decoder.rotary:
        edits.append(_DECODER_ROTARY_BLOCKS)
    if table is None:
        edits += [_decoder_drops_table_on_load("this decoder has no table"), _DECODER_WITHOUT_TABLE_FORWARD]
    elif table == "sinusoidal":
        edits.append(_decoder_drops_table_on_load("the sinusoids are recomputed"))
    else:
        edits += _LEARNED_SINUSOIDAL_LOAD
    return edits


def apply_edits(sources: Dict[str, str], edits: Sequence[SourceEdit], version: str = "?") -> Dict[str, str]:
    """Apply ``edits`` to upstream ``sources`` (file -> text). Raises PatchAnchorError for a missing anchor."""
    result = dict(sources)
    for edit in edits:
        text = result[edit.file]
        count = text.count(edit.anchor)
        if count != 1:
            first_line = edit.anchor.strip().splitlines()[0]
            raise PatchAnchorError(
                f"whisper/{edit.file} of openai-whisper {version} contains the anchor of edit '{edit.purpose}' "
                f"({first_line!r}) {count} times, expected exactly once: upstream changed, so update that edit in "
                "tools/patches.py"
            )
        result[edit.file] = text.replace(edit.anchor, edit.replacement)
    return result


# --- rendering ----------------------------------------------------------------------------------------------------


def upstream_package_dir() -> Path:
    """The folder of the installed ``whisper`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WhisperRopeError("the 'whisper' package (openai-whisper) is not installed; pass --upstream DIR")
    return Path(list(spec.submodule_search_locations)[0])


def upstream_version(package_dir: Path) -> str:
    """The openai-whisper release of a ``whisper`` package folder, read from its ``version.py``."""
    version_file = Path(package_dir) / "version.py"
    if not version_file.is_file():
        raise WhisperRopeError(f"{package_dir} is not a 'whisper' package folder: it has no version.py")
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", version_file.read_text())
    if match is None:
        raise WhisperRopeError(f"{version_file} does not define __version__")
    return match.group(1)


def _header(preset: str, version: str) -> str:
    variant = parse_variant(preset)
    decoder = variant.decoder
    name = patch_file_name(preset)
    aka = f" (variant {variant.name})" if variant.name != preset else ""
    files = sorted({edit.file for edit in edits_for(preset)}, key=lambda f: f != "model.py")
    decoder_change = {
        "rotary": "RoPE on the queries and keys of every self-attention; no positional table",
        "sinusoidal": "fixed sinusoids (whisper.model.sinusoids) added to the token\n"
        "           embeddings, not trained",
        "rotary+sinusoidal": "RoPE on the queries and keys of every self-attention, plus fixed\n"
        "           sinusoids added to the token embeddings, not trained",
        "learned-sinusoidal": "a trainable table initialised with sinusoids, added to the token\n           embeddings",
    }[decoder.name]
    decoder_rule = {
        None: "dropped: this decoder has no table",
        "sinusoidal": "dropped: the fixed sinusoids are recomputed, never stored",
        "learned-sinusoidal": "re-initialised with sinusoids, unless the checkpoint's\n"
        '                                "variant" entry names a learned-sinusoidal decoder (then\n'
        "                                loaded); a checkpoint without one is upstream's",
    }[decoder.table]
    lines = [
        f'whisper_rope preset "{preset}"{aka} for openai-whisper {version}.',
        "Generated by `python tools/patches.py regenerate`; do not edit by hand",
        "(tests/tools/test_patches.py checks that this file equals the generator's output).",
        "",
        f"Changes {' and '.join('whisper/' + f for f in files)}. Apply it from the root of an",
        f"unpacked openai-whisper {version} source tree, or from the site-packages directory",
        "holding the installed `whisper` package (both have whisper/model.py at that path):",
        f"    patch -p1 < {name}",
        "Never patch the environment whisper_rope runs in: it subclasses the unpatched classes.",
        "",
        "What changes, computing what whisper_rope computes:",
        "  encoder  RoPE on the queries and keys of every self-attention; no positional table,",
        "           so any number of mel frames is accepted",
        f"  decoder  {decoder_change}",
        "  RoPE     the head dimension is split in halves (x1, x2); pair i turns by",
        "           position * 10000 ** (-2 i / head_dim), angles in fp32, then cast;",
        "           cross-attention is never rotated",
        "  kv-cache the hooks cache raw keys, rotated after the cache: keys at positions",
        "           0 .. n_k - 1, queries at n_k - n_q .. n_k - 1; the causal mask is aligned",
        "           the same way, so several tokens fed onto a non-empty cache are right too",
        "Unchanged: public names, the checkpoint keys of every other tensor, the kv-cache hooks,",
        "the qk return and disable_sdpa() that word timestamps use.",
        "",
        "Checkpoints load (whisper.load_model, Whisper.load_state_dict) by whisper_rope's rules:",
        "  encoder.positional_embedding  dropped: this encoder has no table",
        f"  decoder.positional_embedding  {decoder_rule}",
        "  every other tensor            loaded strictly: a missing or unexpected one is an error",
        'To hand a fine-tuned model to whisper_rope, save {"dims": asdict(model.dims),',
        '"model_state_dict": model.state_dict(), "variant": whisper.model.POSITIONAL_VARIANT}.',
    ]
    return "".join(f"# {line}".rstrip() + "\n" for line in "\n".join(lines).split("\n")) + "\n"


def render_patch(preset: str, package_dir: Optional[Path] = None) -> str:
    """The patch text of ``preset`` against the upstream package in ``package_dir`` (default: the installed one)."""
    package_dir = Path(package_dir) if package_dir is not None else upstream_package_dir()
    version = upstream_version(package_dir)
    edits = edits_for(preset)
    files = sorted({edit.file for edit in edits}, key=lambda f: (f != "model.py", f))
    sources = {}
    for file in files:
        text = (package_dir / file).read_text(encoding="utf-8")
        if not text.endswith("\n"):
            raise PatchAnchorError(f"{package_dir / file} does not end with a newline; the patches assume it does")
        sources[file] = text
    patched = apply_edits(sources, edits, version)
    diff = []
    for file in files:
        path = f"{PACKAGE}/{file}"
        diff += difflib.unified_diff(
            sources[file].splitlines(keepends=True),
            patched[file].splitlines(keepends=True),
            fromfile=f"a/{path}",
            tofile=f"b/{path}",
            n=3,
        )
    return _header(preset, version) + "".join(diff)


def render_patches(package_dir: Optional[Path] = None) -> Dict[str, str]:
    """Patch file name -> text, for every preset that has a patch."""
    return {patch_file_name(preset): render_patch(preset, package_dir) for preset in PATCHED_PRESETS}


def default_patch_dir(package_dir: Optional[Path] = None) -> Path:
    """``patches/openai-whisper-<version>`` of this repository."""
    package_dir = Path(package_dir) if package_dir is not None else upstream_package_dir()
    return REPOSITORY / "patches" / f"openai-whisper-{upstream_version(package_dir)}"


def regenerate(package_dir: Optional[Path] = None, out: Optional[Path] = None) -> List[Path]:
    """Write every preset's patch into ``out``; remove ``*.patch`` files there that no preset produces.

    Returns the written paths.
    """
    package_dir = Path(package_dir) if package_dir is not None else upstream_package_dir()
    out = Path(out) if out is not None else default_patch_dir(package_dir)
    rendered = render_patches(package_dir)  # every anchor checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob("*.patch")):
        if stale.name not in rendered:
            stale.unlink()
    written = []
    for name, text in rendered.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --- checking -----------------------------------------------------------------------------------------------------


def _patch_program() -> str:
    program = shutil.which("patch")
    if program is None:
        raise WhisperRopeError("GNU patch is not installed (Debian/Ubuntu: apt-get install patch); check needs it")
    return program


def _dry_run(patch_file: Path, package_dir: Path) -> PatchStatus:
    """``patch --dry-run -p1 -F0`` of one file against a temporary copy of the package."""
    preset = next((p for p in PATCHED_PRESETS if patch_file_name(p) == patch_file.name), None)
    with tempfile.TemporaryDirectory(prefix="whisper-patch-check-") as root:
        shutil.copytree(package_dir, Path(root) / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
        completed = subprocess.run(
            [_patch_program(), "--dry-run", "--forward", "-p1", "-F0", "-i", str(patch_file.resolve())],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    output = completed.stdout.strip()
    if completed.returncode != 0:
        failures = [line for line in output.splitlines() if "FAILED" in line or "Skipping" in line or "can't" in line]
        return PatchStatus(patch_file.name, preset, "fails", "; ".join(failures) or output)
    shifted = [line for line in output.splitlines() if "offset" in line or "fuzz" in line]
    if shifted:
        return PatchStatus(patch_file.name, preset, "shifted", "; ".join(shifted))
    return PatchStatus(patch_file.name, preset, "clean")


def check_patches(patch_dir: Optional[Path] = None, package_dir: Optional[Path] = None) -> List[PatchStatus]:
    """Whether each patch in ``patch_dir`` applies exactly to the upstream package; a preset without one is
    reported ``missing``."""
    package_dir = Path(package_dir) if package_dir is not None else upstream_package_dir()
    patch_dir = Path(patch_dir) if patch_dir is not None else default_patch_dir(package_dir)
    if not patch_dir.is_dir():
        raise WhisperRopeError(f"patch directory {str(patch_dir)!r} does not exist; pass --patches DIR")
    results = [_dry_run(path, package_dir) for path in sorted(patch_dir.glob("*.patch"))]
    present = {result.name for result in results}
    results += [
        PatchStatus(patch_file_name(p), p, "missing", "run regenerate")
        for p in PATCHED_PRESETS
        if patch_file_name(p) not in present
    ]
    return results


_STATUS_TEXT = {
    "clean": "applies cleanly",
    "shifted": "applies only at shifted lines (upstream changed; run regenerate)",
    "fails": "does not apply",
    "missing": "missing",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/patches.py",
        description="Unified diffs of whisper_rope's presets against upstream whisper/model.py.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    regen = commands.add_parser("regenerate", help="rebuild the patches from an upstream whisper package")
    regen.add_argument(
        "--upstream", type=Path, default=None, help="the upstream 'whisper' package folder (default: the installed one)"
    )
    regen.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: patches/openai-whisper-<upstream version> of this repository)",
    )
    check = commands.add_parser("check", help="tell whether each patch applies exactly to the upstream package")
    check.add_argument(
        "--upstream", type=Path, default=None, help="the upstream 'whisper' package folder (default: the installed one)"
    )
    check.add_argument(
        "--patches",
        type=Path,
        default=None,
        help="the patch folder (default: patches/openai-whisper-<upstream version> of this repository)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "regenerate":
            for path in regenerate(args.upstream, args.out):
                print(f"wrote {path}")
            return 0
        package_dir = args.upstream or upstream_package_dir()
        print(f"upstream: openai-whisper {upstream_version(package_dir)} at {package_dir}")
        results = check_patches(args.patches, package_dir)
        for result in results:
            preset = f" ({parse_variant(result.preset).name})" if result.preset else ""
            detail = f": {result.detail}" if result.detail and not result.clean else ""
            print(f"{result.name}{preset}: {_STATUS_TEXT[result.status]}{detail}")
        return 0 if all(result.clean for result in results) else 1
    except (WhisperRopeError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
