"""Whisper with pluggable positional schemes, as subclasses of `whisper.model`.

Only *how positions enter* changes; weights, tokenizer, ``transcribe``, ``decode``, beam search and word timestamps
stay upstream's. Module and parameter names are upstream's too, so pretrained state dicts load unchanged.

Shapes use: batch ``b``, mel frames ``n_frames`` (10 ms each), audio positions ``n_audio = ceil(n_frames / 2)``
(20 ms each), text tokens ``n_tokens``.
"""

import functools
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from whisper import model as upstream
from whisper.audio import SAMPLE_RATE
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import (
    AudioEncoder,
    ModelDimensions,
    MultiHeadAttention,
    ResidualAttentionBlock,
    TextDecoder,
    Whisper,
)
from whisper.transcribe import transcribe as upstream_transcribe

from .adapted_lengths import warn_outside
from .audio import load_audio
from .decoding.task import BatchDecodingTask
from .features import audio_position_mask, cut_trailing_padding
from .fields import EOT_PENALTY
from .packing import PackedClips, block_diagonal_attention
from .positional import RotaryEmbedding
from .variants import SideScheme, Variant, parse_variant

DEFAULT_ROTARY_THETA = 10000.0


@dataclass(frozen=True)
class ModelSettings:
    """How a `WhisperRope` runs, apart from its weights. The model owns one (``model.settings``), hands it to its
    encoder and decoder, and replaces it only through `WhisperRope.configure` and `WhisperRope.using`.

    unpadded: the encoder drops the 30-s padding upstream's ``transcribe`` appends and encodes each clip's own
        frames (`PositionalAudioEncoder`); an absolute table is then sliced.
    unpadded_margin: padding positions an unpadded encoder keeps after each clip's real frames.
    eot_penalty: nats taken off the end-of-text logit at every decoding step of a window that holds the end of its
        audio, except where the text already loops or its timestamps reached the audio's end
        (`decoding.end_of_text.EndOfTextPenalty`): a model adapted to unpadded input ends the text a little more
        eagerly than its source at sentence ends (docs/results.md, "Why windows still end early"); 0 decodes as
        upstream.
    table_scales: (encoder, decoder) factors of the absolute tables: 1 as trained, annealed towards 0 by positional
        transplant schedules (`training/transplant.py`).
    one_clip_per_call: the encoder takes a batch's clips one at a time, each at its own frames (int8 models:
        `compute_type.mark_int8` says why).
    audio_kv_dtype: None caches cross-attention keys and values as upstream, (b, n_audio, n_state) in the model's
        dtype; a dtype caches them heads-major in it (`cache_audio_heads`; int8 models).
    """

    unpadded: bool = False
    unpadded_margin: int = 0
    eot_penalty: float = 0.0
    table_scales: Tuple[float, float] = (1.0, 1.0)
    one_clip_per_call: bool = False
    audio_kv_dtype: Optional[torch.dtype] = None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, n_head: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Attention of q (b, n_q, n_state) onto k, v (b, n_k, n_state) through an explicit boolean mask broadcastable
    to (b, n_head, n_q, n_k), True = may attend. Returns ((b, n_q, n_state), scores (b, n_head, n_q, n_k) fp32 when
    upstream's SDPA is off, else None), as upstream's ``qkv_attention``."""
    b, n_q, n_state = q.shape
    q, k, v = (t.view(b, t.shape[1], n_head, -1).transpose(1, 2) for t in (q, k, v))
    if upstream.SDPA_AVAILABLE and MultiHeadAttention.use_sdpa:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return out.transpose(1, 2).flatten(start_dim=2), None
    scale = (n_state // n_head) ** -0.25
    qk = ((q * scale) @ (k * scale).transpose(-1, -2)).float()
    qk = qk.masked_fill(~allowed, float("-inf"))
    weights = qk.softmax(dim=-1).to(q.dtype)
    out = (weights @ v).transpose(1, 2).flatten(start_dim=2)
    return out, qk.detach()


class SelfAttention(MultiHeadAttention):
    """The encoder's self-attention: upstream's, plus optional (gated) RoPE, a key-padding mask or packed clips.

    rotary: rotates queries and keys. With upstream's kv-cache hooks (decoder, `CausalSelfAttention`) the cached
        keys are the raw projections of positions ``0 .. n_k - 1``, so queries sit at ``offset .. offset + n_q - 1``
        with ``offset = n_k - n_q`` and the rotation happens here, after the cache.
    gated: a learnable per-head gate ``g`` (initialised to 0) mixes the rotation in: ``x + g * (rope(x) - x)``;
        at ``g = 0`` the module computes exactly the un-rotated function.

    ``mask`` is None, a boolean key mask (b, n_k), True where a key may be attended, or a `PackedClips` layout: the
    input (1, total, n_state) is several clips packed end to end, each attending to itself only, rotated by its
    positions within its clip (`packing.py`).
    """

    def __init__(self, n_state: int, n_head: int, rotary: Optional[RotaryEmbedding] = None, gated: bool = False):
        super().__init__(n_state, n_head)
        self.rotary = rotary
        self.rotary_gate = nn.Parameter(torch.zeros(n_head)) if (gated and rotary is not None) else None

    def _rotate(self, x: Tensor, offset: int, positions: Optional[Tensor] = None) -> Tensor:
        """(b, n, n_state) -> (b, n, n_state), every head rotated: token j at ``offset + j``, or at
        ``positions[j]`` when given."""
        heads = x.view(*x.shape[:2], self.n_head, -1)
        rotated = self.rotary.rotate(heads, offset) if positions is None else self.rotary.rotate_at(heads, positions)
        if self.rotary_gate is not None:
            gate = self.rotary_gate.to(x.dtype)[:, None]
            rotated = heads + gate * (rotated - heads)
        return rotated.reshape(x.shape)

    def _rotated(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """q (b, n_q, n_state) and k (b, n_k, n_state) rotated to their positions (the queries are the last n_q of
        the n_k); unchanged without RoPE."""
        if self.rotary is None:
            return q, k
        return self._rotate(q, k.shape[1] - q.shape[1]), self._rotate(k, 0)

    def qkv_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: "Tensor | PackedClips | None" = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if isinstance(mask, PackedClips):
            return self._packed_attention(q, k, v, mask)
        q, k = self._rotated(q, k)
        if mask is None:
            return super().qkv_attention(q, k, v, None)
        return masked_attention(q, k, v, mask[:, None, None, :], self.n_head)

    def _packed_attention(self, q: Tensor, k: Tensor, v: Tensor, clips: PackedClips) -> Tuple[Tensor, None]:
        """Self-attention of packed clips: q, k, v (1, total, n_state) -> (1, total, n_state), block-diagonal."""
        if self.rotary is not None:
            q, k = self._rotate(q, 0, clips.positions), self._rotate(k, 0, clips.positions)
        q, k, v = (t.view(t.shape[1], self.n_head, -1) for t in (q, k, v))
        return block_diagonal_attention(q, k, v, clips).flatten(start_dim=1)[None], None


class CausalSelfAttention(SelfAttention):
    """The decoder's self-attention: `SelfAttention`'s RoPE; ``mask`` is the decoder's (n_text_ctx, n_text_ctx)
    causal table, aligned to the kv-cache's offset when several tokens are fed onto a non-empty cache."""

    def qkv_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        q, k = self._rotated(q, k)
        n_q, n_k = q.shape[1], k.shape[1]
        if mask is None or n_q == n_k or n_q == 1:
            # The shapes upstream decoding produces: upstream's own code is right for them (and stays bit-identical
            # for the `whisper` variant).
            return MultiHeadAttention.qkv_attention(self, q, k, v, mask)
        # Several tokens onto a non-empty cache: upstream would take the table's top-left corner.
        return masked_attention(q, k, v, mask[n_k - n_q : n_k, :n_k] == 0, self.n_head)


class CrossAttention(MultiHeadAttention):
    """The decoder's cross-attention onto the audio: upstream's, plus a key mask over audio positions, several
    decoding rows per clip, and keys and values cached heads-major (int8 compute). Never rotated: text positions
    and audio frames share no position space.

    q: (b * g, n_q, n_state), g consecutive decoding rows per clip (beams, samples); k, v: the audio's projections
    (b, n_audio, n_state), encoded once per clip, or as cached by `cache_audio_heads` (b, n_head, n_audio,
    head_dim); mask: (b, n_audio) bool, True for a clip's real positions, or None.
    """

    rotary: Optional[RotaryEmbedding] = None  # as on the self-attentions, for code that reads any attention

    def qkv_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if k.ndim == 4:
            return self._cached_audio_attention(q, k, v, mask)
        if k.shape[0] < q.shape[0] and (k.shape[0] > 1 or mask is not None):
            # Several rows per clip. One clip without a mask keeps upstream's broadcast (bit-identical to it).
            return self._grouped_attention(q, k, v, mask)
        if mask is None:
            return super().qkv_attention(q, k, v, None)
        return masked_attention(q, k, v, mask[:, None, None, :], self.n_head)

    def _grouped_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Cross-attention of the g rows of each clip onto that clip's one row of audio keys (b, n_audio, n_state).

        The g rows of a clip become g * n_q queries of that clip: cross-attention has no causal order, so this is
        the same attention without g copies of the audio keys. Upstream relies on broadcasting instead, which only
        works for one clip.
        """
        n_rows, n_q, n_state = q.shape
        n_clips = _clips_of(n_rows, k)
        out, qk = self.qkv_attention(q.reshape(n_clips, -1, n_state), k, v, mask)
        if qk is not None:  # (b, n_head, g * n_q, n_audio) -> (b * g, n_head, n_q, n_audio)
            qk = qk.unflatten(2, (n_rows // n_clips, n_q)).transpose(1, 2).flatten(0, 1)
        return out.reshape(n_rows, n_q, -1), qk

    def _cached_audio_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Cross-attention onto audio keys and values cached heads-major by `cache_audio_heads` (int8 compute).

        k: (b, n_head, n_audio, head_dim), already multiplied by ``head_dim ** -0.5``; v: (b, n_head, n_audio,
        head_dim). The g rows of a clip are its g * n_q queries (as in `_grouped_attention`), so the audio is read
        once per clip. Products run in k's dtype (bfloat16: half the bytes, and the CPU's native bf16 dot products),
        softmax in fp32. Returns ((b * g, n_q, n_state) in q's dtype, scores (b * g, n_head, n_q, n_audio) fp32 when
        upstream's SDPA is off, else None).
        """
        n_rows, n_q, n_state = q.shape
        n_clips = _clips_of(n_rows, k)
        queries = q.reshape(n_clips, -1, self.n_head, n_state // self.n_head).transpose(1, 2).to(k.dtype)
        scores = (queries @ k.transpose(-1, -2)).float()
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = (scores.softmax(dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(n_rows, n_q, n_state).to(q.dtype)
        if upstream.SDPA_AVAILABLE and MultiHeadAttention.use_sdpa:
            return out, None
        return out, scores.unflatten(2, (n_rows // n_clips, n_q)).transpose(1, 2).flatten(0, 1)


def _clips_of(n_rows: int, k: Tensor) -> int:
    """The clips of audio keys ``k`` (one per row of dim 0), which ``n_rows`` decoding rows must share evenly."""
    n_clips = k.shape[0]
    if n_rows % n_clips:
        raise ValueError(f"{n_rows} decoding rows cannot be split evenly over {n_clips} audio clips")
    return n_clips


def cache_audio_heads(
    cache: dict, n_head: int, dtype: torch.dtype, scale: float, module: nn.Module, inputs: tuple, output: Tensor
) -> Tensor:
    """Forward hook of a cross-attention key or value projection (after upstream's, which cached ``output``):
    cache and return ``output * scale`` as (b, n_head, n_audio, head_dim) in ``dtype``, contiguous.

    Upstream caches (b, n_audio, n_state) and every decoding step reads it through a strided per-head view; heads
    laid out one after another (and bfloat16's half the bytes) make that read, the largest of a step, several times
    cheaper. Keys carry attention's scale, so that the step multiplies nothing.
    """
    b, n_audio, n_state = output.shape
    heads = (output * scale).view(b, n_audio, n_head, n_state // n_head).transpose(1, 2).to(dtype).contiguous()
    cache[module] = heads
    return heads


class PositionalResidualBlock(ResidualAttentionBlock):
    """Upstream residual block with our attentions under upstream's names (``attn``: `SelfAttention`, or
    `CausalSelfAttention` in the decoder; ``cross_attn``: `CrossAttention`); accepts a mask over audio frames."""

    def __init__(
        self,
        n_state: int,
        n_head: int,
        cross_attention: bool = False,
        rotary: Optional[RotaryEmbedding] = None,
        gated: bool = False,
    ):
        super().__init__(n_state, n_head, cross_attention)
        # A block with cross-attention is the decoder's, whose self-attention is causal.
        self_attention = CausalSelfAttention if cross_attention else SelfAttention
        self.attn = self_attention(n_state, n_head, rotary=rotary, gated=gated)
        if cross_attention:
            self.cross_attn = CrossAttention(n_state, n_head)

    def forward(
        self,
        x: Tensor,
        xa: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        kv_cache: Optional[dict] = None,
        xa_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """x: (b, n, n_state); xa: (b, n_audio, n_state) or None; xa_mask: (b, n_audio) bool, True = real frame."""
        if xa_mask is None:
            return super().forward(x, xa, mask=mask, kv_cache=kv_cache)
        x = x + self.attn(self.attn_ln(x), mask=mask, kv_cache=kv_cache)[0]
        x = x + self.cross_attn(self.cross_attn_ln(x), xa, mask=xa_mask, kv_cache=kv_cache)[0]
        return x + self.mlp(self.mlp_ln(x))


def _rotary_embedding(scheme: SideScheme, head_dim: int, theta: float, n_ctx: int) -> Optional[RotaryEmbedding]:
    """One side's RoPE tables, shared by all its layers; None when the side's scheme does not rotate."""
    return RotaryEmbedding(head_dim, theta, n_ctx) if scheme.rotary else None


class _PositionalSide:
    """What the encoder and the decoder share about their positions: ``scheme`` (their `SideScheme`), the model's
    ``settings`` and ``SIDE``, their index in ``settings.table_scales`` (0 encoder, 1 decoder)."""

    SIDE: int
    scheme: SideScheme
    settings: ModelSettings

    @property
    def has_table(self) -> bool:
        return self.scheme.table is not None

    @property
    def table_scale(self) -> float:
        """The factor of the absolute table (``settings.table_scales[SIDE]``)."""
        return self.settings.table_scales[self.SIDE]


class PositionalAudioEncoder(_PositionalSide, AudioEncoder):
    """Upstream's encoder with the sinusoid table optional and RoPE optional; it runs as its model's `ModelSettings`
    (``settings``) say.

    Without a table the encoder accepts any number of mel frames. With ``settings.unpadded`` it encodes only each
    clip's frames before the padding upstream's ``transcribe`` appends (see `whisper_rope.features.real_frame_counts`),
    plus ``settings.unpadded_margin`` positions of that padding, and an absolute table is *sliced*: ``n`` positions
    get its rows ``0 .. n - 1``, as whisper.cpp's ``audio_ctx`` does (at most ``n_ctx`` positions).
    """

    SIDE = 0

    def __init__(
        self, dims: ModelDimensions, scheme: SideScheme, rotary_theta: float = DEFAULT_ROTARY_THETA, gated: bool = False
    ):
        """The encoder of a model of ``dims`` (its ``n_mels`` and ``n_audio_*`` fields)."""
        n_state, n_head = dims.n_audio_state, dims.n_audio_head
        super().__init__(dims.n_mels, dims.n_audio_ctx, n_state, n_head, n_layer=0)
        self.n_ctx = dims.n_audio_ctx
        self.scheme = scheme
        self.rotary = _rotary_embedding(scheme, n_state // n_head, rotary_theta, self.n_ctx)
        if scheme.table is None:
            del self.positional_embedding
        self.blocks = nn.ModuleList(
            PositionalResidualBlock(n_state, n_head, rotary=self.rotary, gated=gated) for _ in range(dims.n_audio_layer)
        )
        self.settings = ModelSettings()  # the model's, once built into one (`WhisperRope.configure`)

    @property
    def adds_table(self) -> bool:
        """Whether an absolute table is added (a table annealed to scale 0 by a transplant adds nothing)."""
        return self.has_table and self.table_scale != 0.0

    @property
    def needs_full_window(self) -> bool:
        """Whether input must be exactly the 30-s window: true while a table is added to padded input. An unpadded
        encoder slices its table instead, and one without a (non-zero) table takes any length."""
        return self.adds_table and not self.settings.unpadded

    def forward(self, x: Tensor, n_frames: Optional[Tensor] = None, packed: bool = False) -> Tensor:
        """x: (b, n_mels, n_frames) log-mel; n_frames: (b,) real frames per item of a padded batch, or None.

        Returns (b, n_audio, n_state). Frames past ``n_frames`` (whatever their value) are zeroed before each conv,
        as a lone clip's zero padding, and masked out of self-attention; with ``packed``, the blocks instead see the
        clips' real positions packed into one sequence with block-diagonal attention (`packing.py`: no padding
        computed, no mask), and the output's padding positions are zeros. With ``settings.one_clip_per_call`` each
        clip is encoded alone at its own frames (the same function), the output's padding positions zeros. With
        ``settings.unpadded`` and no ``n_frames``, the input is first cut where its padding starts.
        """
        if self.settings.unpadded and n_frames is None:
            x, n_frames = cut_trailing_padding(x, self.settings.unpadded_margin)
        self._check_length(x)
        if self.settings.one_clip_per_call and x.shape[0] > 1:
            return self._encode_one_by_one(x, n_frames)
        return self._encode(x, n_frames, packed)

    def _encode(self, x: Tensor, n_frames: Optional[Tensor], packed: bool) -> Tensor:
        """`forward` after the padding is cut and the length checked."""
        if n_frames is not None:
            # A lone clip's convs see zeros beyond its last frame: zero the padding (whatever its value) before
            # conv1, and what conv1 made of it before conv2.
            real = (torch.arange(x.shape[-1], device=x.device)[None, :] < n_frames.to(x.device)[:, None])[:, None]
            x = x * real
        x = F.gelu(self.conv1(x))
        if n_frames is not None:
            x = x * real
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        if self.adds_table:
            table = self.positional_embedding[: x.shape[1]]  # the whole table for a 30-s window
            x = (x + (table if self.table_scale == 1.0 else table * self.table_scale)).to(x.dtype)
        if packed and n_frames is not None:
            clips = PackedClips.from_lengths((n_frames.to(x.device) + 1) // 2)
            h = clips.pack(x)
            for block in self.blocks:
                h = block(h, mask=clips)
            return clips.unpack(self.ln_post(h), x.shape[1])
        key_mask = audio_position_mask(n_frames, x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, mask=key_mask)
        return self.ln_post(x)

    def _encode_one_by_one(self, x: Tensor, n_frames: Optional[Tensor]) -> Tensor:
        """`_encode` of each clip alone, at its own ``n_frames``; padding positions of the output are zeros."""
        frames = [x.shape[-1]] * x.shape[0] if n_frames is None else n_frames.tolist()
        out = x.new_zeros(x.shape[0], (x.shape[-1] + 1) // 2, self.ln_post.normalized_shape[0])
        for i, n in enumerate(frames):
            clip = self._encode(x[i : i + 1, :, :n], None, packed=False)
            out[i, : clip.shape[1]] = clip[0]
        return out

    def _check_length(self, x: Tensor) -> None:
        """Refuse mel input the table cannot position: not the 30-s window, or (sliced) longer than the table."""
        n_frames = x.shape[-1]
        if self.needs_full_window and n_frames != 2 * self.n_ctx:
            raise ValueError(
                f"mel input has {n_frames} frames (shape {tuple(x.shape)}); encoder scheme "
                f"{self.scheme.name!r} adds a {self.n_ctx}-position table and needs exactly {2 * self.n_ctx} frames "
                "(pad with whisper.pad_or_trim, use unpadded encoding, or a rotary-only encoder for other lengths)"
            )
        if self.adds_table and n_frames > 2 * self.n_ctx:
            raise ValueError(
                f"mel input has {n_frames} frames (shape {tuple(x.shape)}); encoder scheme {self.scheme.name!r} "
                f"slices a {self.n_ctx}-position table and takes at most {2 * self.n_ctx} frames"
            )


class PositionalTextDecoder(_PositionalSide, TextDecoder):
    """Upstream's decoder with the positional table chosen by the scheme and optional RoPE in self-attention; it runs
    as its model's `ModelSettings` (``settings``) say.

    Tables: ``learned`` (upstream's parameter), ``learned-sinusoidal`` (a parameter initialised with sinusoids),
    ``sinusoidal`` (a fixed, non-persistent buffer: not in the state dict), or none.
    """

    SIDE = 1

    def __init__(
        self, dims: ModelDimensions, scheme: SideScheme, rotary_theta: float = DEFAULT_ROTARY_THETA, gated: bool = False
    ):
        """The decoder of a model of ``dims`` (its ``n_vocab`` and ``n_text_*`` fields)."""
        n_ctx, n_state, n_head = dims.n_text_ctx, dims.n_text_state, dims.n_text_head
        super().__init__(dims.n_vocab, n_ctx, n_state, n_head, n_layer=0)
        self.scheme = scheme
        self.rotary = _rotary_embedding(scheme, n_state // n_head, rotary_theta, n_ctx)
        table = scheme.table
        if table is None:
            del self.positional_embedding
        elif table == "sinusoidal":
            del self.positional_embedding
            self.register_buffer("positional_embedding", upstream.sinusoids(n_ctx, n_state), persistent=False)
        elif table == "learned-sinusoidal":
            self.positional_embedding = nn.Parameter(upstream.sinusoids(n_ctx, n_state))
        else:
            # Upstream leaves the learned table uninitialised (it is always loaded); a model built from scratch
            # needs finite values.
            nn.init.normal_(self.positional_embedding, std=0.01)
        self.blocks = nn.ModuleList(
            PositionalResidualBlock(n_state, n_head, cross_attention=True, rotary=self.rotary, gated=gated)
            for _ in range(dims.n_text_layer)
        )
        self.settings = ModelSettings()  # the model's, once built into one (`WhisperRope.configure`)
        # None: logits through the tied fp32 embedding, as upstream. compute_type.quantize_int8 sets a module.
        self.output_projection: Optional[nn.Module] = None

    def forward(
        self, x: Tensor, xa: Tensor, kv_cache: Optional[dict] = None, xa_mask: Optional[Tensor] = None
    ) -> Tensor:
        """x: (b, n_tokens) token ids; xa: (b, n_audio, n_audio_state); xa_mask: (b, n_audio) bool or None.

        Returns logits (b, n_tokens, n_vocab) in fp32.
        """
        return self.logits(self.hidden(x, xa, kv_cache, xa_mask))

    def hidden(
        self, x: Tensor, xa: Tensor, kv_cache: Optional[dict] = None, xa_mask: Optional[Tensor] = None
    ) -> Tensor:
        """The final layer norm's output (b, n_tokens, n_text_state): what the logits are made of. Distillation on
        hidden states alone needs no (n_vocab-wide) output projection."""
        offset = next(iter(kv_cache.values())).shape[1] if kv_cache else 0
        h = self.token_embedding(x)
        if self.has_table:
            table = self.positional_embedding[offset : offset + x.shape[-1]]
            h = h + (table if self.table_scale == 1.0 else table * self.table_scale)
        h = h.to(xa.dtype)
        for block in self.blocks:
            h = block(h, xa, mask=self.mask, kv_cache=kv_cache, xa_mask=xa_mask)
        return self.ln(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """(b, n_tokens, n_text_state) -> (b, n_tokens, n_vocab) fp32, through the tied token embedding (or its
        quantised copy, ``output_projection``, set by compute_type.py)."""
        if self.output_projection is not None:
            return self.output_projection(hidden).float()
        return (hidden @ self.token_embedding.weight.to(hidden.dtype).transpose(0, 1)).float()


class WithoutRandomInit(TorchFunctionMode):
    """Inside it, the random initialisation of layers (``nn.init``'s random fills, and ``normal_``/``uniform_``)
    does nothing: the tensors keep the memory they were allocated with. For building a model whose every randomly
    initialised tensor is then loaded from a checkpoint: tiny.en's random fills take about 0.3 CPU s, a third of
    them on embeddings that upstream's constructor builds and `WhisperRope` replaces. Per thread (torch's mode
    stack), so a model built on another thread meanwhile is initialised as usual."""

    RANDOM_FILLS = frozenset(
        {
            nn.init.normal_,
            nn.init.uniform_,
            nn.init.trunc_normal_,
            nn.init.kaiming_uniform_,
            nn.init.kaiming_normal_,
            nn.init.xavier_uniform_,
            nn.init.xavier_normal_,
            Tensor.normal_,
            Tensor.uniform_,
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


class WhisperRope(Whisper):
    """`whisper.model.Whisper` with a positional variant; upstream's decode/transcribe/detect_language work as is.

    How it runs apart from its weights (unpadded input, table scales, int8's switches) is one `ModelSettings`,
    ``settings``, changed through `configure` (for good) or `using` (for a block).

    Attributes:
        variant: canonical ``ENCODER/DECODER`` string.
        rotary_options: options stored in checkpoints (``theta``, ``gated``, ``unpadded``, ``unpadded_margin``, and
            ``eot_penalty`` and ``adapted_seconds`` once set).
        adapted_seconds: (shortest, longest) training window in seconds of the run that fine-tuned the model
            (None: not recorded); unpadded input far outside it is warned about (`adaptation.warn_outside`).
        load_report: set by `whisper_rope.load_model` (what was loaded, dropped, newly initialised).
    """

    def __init__(
        self,
        dims: ModelDimensions,
        variant: "str | Variant" = "whisper",
        rotary_theta: float = DEFAULT_ROTARY_THETA,
        gated_rotary: bool = False,
    ):
        parsed = parse_variant(variant)
        # Upstream's constructor builds its own encoder and decoder, which ours replace: let it build them without
        # layers so that the discarded copies cost almost nothing.
        super().__init__(replace(dims, n_audio_layer=0, n_text_layer=0))
        self.dims = dims
        self.encoder = PositionalAudioEncoder(dims, parsed.encoder, rotary_theta, gated_rotary)
        self.decoder = PositionalTextDecoder(dims, parsed.decoder, rotary_theta, gated_rotary)
        # Upstream's default alignment heads (the decoder's last half), rebuilt for the real layer count.
        heads = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        heads[dims.n_text_layer // 2 :] = True
        self.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
        self._variant = parsed
        self.rotary_theta = float(rotary_theta)
        self.gated_rotary = bool(gated_rotary and parsed.uses_rotary)
        self.load_report = None
        self.compute_type = "float32"  # "int8" once compute_type.quantize_int8 has run
        self.adapted_seconds: Optional[Tuple[float, float]] = None
        self.trained_unpadded = False  # set by load_model from the checkpoint; not stored
        self._install(ModelSettings())

    @property
    def variant(self) -> str:
        return self._variant.name

    def install_kv_cache_hooks(self, cache: Optional[dict] = None) -> Tuple[dict, list]:
        """Upstream's kv-cache hooks; with ``settings.audio_kv_dtype`` set, each cross-attention's keys and values
        are cached once per clip in the layout and dtype `CrossAttention` reads fastest (`cache_audio_heads`)."""
        cache, hooks = super().install_kv_cache_hooks(cache)
        dtype = self.settings.audio_kv_dtype
        if dtype is not None:
            head_dim = self.dims.n_text_state // self.dims.n_text_head
            for block in self.decoder.blocks:
                for module, scale in ((block.cross_attn.key, head_dim**-0.5), (block.cross_attn.value, 1.0)):
                    save = functools.partial(cache_audio_heads, cache, self.dims.n_text_head, dtype, scale)
                    hooks.append(module.register_forward_hook(save))
        return cache, hooks

    @property
    def parsed_variant(self) -> Variant:
        return self._variant

    @property
    def settings(self) -> ModelSettings:
        """How the model runs apart from its weights; change it with `configure` or `using`."""
        return self._settings

    def configure(self, **changes: object) -> "WhisperRope":
        """Replace the named fields of `settings` (``model.configure(unpadded=True, unpadded_margin=4)``) for good.

        Raises ValueError for an unpadded margin outside 0..n_audio_ctx or an end-of-text penalty outside
        `EOT_PENALTY`, TypeError for a name that is no field.
        Returns the model.
        """
        settings = replace(self._settings, **changes)
        margin = settings.unpadded_margin
        if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= self.dims.n_audio_ctx:
            raise ValueError(
                f"unpadded margin must be an integer in 0..{self.dims.n_audio_ctx} positions, got {margin!r}"
            )
        if not EOT_PENALTY.accepts(settings.eot_penalty):
            raise ValueError(f"end-of-text penalty must be {EOT_PENALTY} nats, got {settings.eot_penalty!r}")
        self._install(replace(settings, unpadded=bool(settings.unpadded), eot_penalty=float(settings.eot_penalty)))
        return self

    @contextmanager
    def using(self, **changes: object) -> Iterator["WhisperRope"]:
        """`configure` for the ``with`` block only (``with model.using(unpadded=True): ...``): the settings before
        it are back afterwards, also when the block raises."""
        saved = self._settings
        self.configure(**changes)
        try:
            yield self
        finally:
            self._install(saved)

    def _install(self, settings: ModelSettings) -> None:
        """Make ``settings`` the model's, and so its encoder's and decoder's (they read the same object)."""
        self._settings = self.encoder.settings = self.decoder.settings = settings

    def set_table_scales(self, encoder: Optional[float] = None, decoder: Optional[float] = None) -> None:
        """Set the factor of the encoder's and the decoder's absolute table; a side given as None keeps its own."""
        old_encoder, old_decoder = self._settings.table_scales
        new = (old_encoder if encoder is None else encoder, old_decoder if decoder is None else decoder)
        self.configure(table_scales=tuple(float(scale) for scale in new))

    @property
    def unpadded(self) -> bool:
        """Whether the encoder drops the 30-s padding upstream's ``transcribe`` feeds it (an absolute table is then
        sliced to the positions that remain): ``settings.unpadded``; assigning it is `configure`."""
        return self._settings.unpadded

    @unpadded.setter
    def unpadded(self, value: bool) -> None:
        self.configure(unpadded=value)

    @property
    def unpadded_margin(self) -> int:
        """Padding positions an unpadded encoder keeps after each clip's real frames: ``settings.unpadded_margin``;
        assigning it is `configure`."""
        return self._settings.unpadded_margin

    @unpadded_margin.setter
    def unpadded_margin(self, value: int) -> None:
        self.configure(unpadded_margin=value)

    @property
    def eot_penalty(self) -> float:
        """Nats taken off the end-of-text logit of windows that hold their audio's end: ``settings.eot_penalty``;
        assigning it is `configure`."""
        return self._settings.eot_penalty

    @eot_penalty.setter
    def eot_penalty(self, value: float) -> None:
        self.configure(eot_penalty=value)

    @property
    def rotary_options(self) -> Dict[str, object]:
        return {
            "theta": self.rotary_theta,
            "gated": self.gated_rotary,
            "unpadded": self.unpadded,
            "unpadded_margin": self.unpadded_margin,
            **({"eot_penalty": self.eot_penalty} if self.eot_penalty else {}),
            **({} if self.adapted_seconds is None else {"adapted_seconds": list(self.adapted_seconds)}),
        }

    def alignment_heads_dense(self) -> Tensor:
        """(n_text_layer, n_text_head) bool."""
        return self.alignment_heads.to_dense().cpu()

    def dims_dict(self) -> Dict[str, int]:
        return asdict(self.dims)

    def transcribe(self, audio: "str | os.PathLike | np.ndarray | Tensor", **kwargs) -> dict:
        """Upstream's `whisper.transcribe`; a file path is decoded in-process first (no ffmpeg for WAV/FLAC/OGG/MP3).

        Takes every keyword of upstream's ``transcribe`` (``language``, ``word_timestamps``, ``fp16``, ...).
        """
        if isinstance(audio, (str, os.PathLike)):
            audio = load_audio(audio)
        warn_outside(self, len(audio) / SAMPLE_RATE)
        return upstream_transcribe(self, audio, **kwargs)

    @torch.no_grad()
    def decode(
        self, mel: Tensor, options: DecodingOptions = DecodingOptions(), **kwargs
    ) -> Union[DecodingResult, List[DecodingResult]]:
        """Upstream's `whisper.decode`, made right for batches: every clip decodes as it would alone.

        Upstream repeats the token rows once per beam (or best-of-n sample) but not the audio features, which only
        works for a single clip; here each clip's features are encoded and cross-attended once for all its rows. For
        an unpadded encoder, clips of different lengths are each encoded from their own frames and the padding is
        masked out of cross-attention (see `BatchDecodingTask`).
        mel: (n_mels, n_frames) or (b, n_mels, n_frames). Returns a DecodingResult or a list of them.
        """
        if kwargs:
            options = replace(options, **kwargs)
        single = mel.ndim == 2
        results = BatchDecodingTask(self, options).run(mel[None] if single else mel)
        return results[0] if single else results

    def forward(self, mel: Tensor, tokens: Tensor, n_frames: Optional[Tensor] = None, packed: bool = False) -> Tensor:
        """mel: (b, n_mels, n_frames); tokens: (b, n_tokens); n_frames: (b,) real frames of a padded batch;
        packed: encode the clips packed (see `PositionalAudioEncoder.forward`).

        Returns logits (b, n_tokens, n_vocab).
        """
        audio = self.encoder(mel, n_frames, packed=packed)
        return self.decoder(tokens, audio, xa_mask=audio_position_mask(n_frames, audio.shape[1], audio.device))
