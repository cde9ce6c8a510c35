"""Positional schemes: rotary embeddings (RoPE) with a cos/sin cache.

The sinusoid table itself is upstream's (`whisper.model.sinusoids`); only the rotary machinery lives here.

Rotation convention: the head dimension is split in two halves ``(x1, x2)`` and pair ``i`` is ``(x1[i], x2[i])``,
rotated by ``position * theta ** (-2 i / head_dim)``. Every head is rotated (the rotation is applied after the
``n_state`` features are split into heads).
"""

from typing import Dict, Tuple

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """(..., d) -> (..., d): ``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_angles(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """Angles of each position and frequency, in fp32.

    positions: (n,) integer positions. Returns (n, head_dim // 2) float32.
    Positions are kept in fp32 even for half-precision models: bf16 cannot represent integers above 256 exactly,
    and the encoder has 1500 positions.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    return positions.to(torch.float32)[:, None] * inv_freq[None, :]


class RotaryEmbedding:
    """Cos/sin tables for one side of the model, computed once per (length, device, dtype) and reused.

    Deliberately not an ``nn.Module``: the tables are a pure function of ``theta`` and ``head_dim``, so they must
    never enter a ``state_dict`` (upstream checkpoints would then fail strict loading) nor be cast by ``.half()``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"rotary theta must be positive, got {theta}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._tables: Dict[Tuple[int, torch.device, torch.dtype], Tuple[Tensor, Tensor]] = {}

    def tables(self, length: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """cos and sin for positions ``0 .. length - 1``, each (length, head_dim), in ``dtype``.

        The cache keeps the longest table per (device, dtype); shorter requests are views of it.
        """
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            angles = rotary_angles(torch.arange(length, device=device), self.head_dim, self.theta)
            angles = torch.cat((angles, angles), dim=-1)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._tables[key] = cached
        return cached[0][:length], cached[1][:length]

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate queries or keys.

        x: (batch, n_ctx, n_head, head_dim), the token at index ``j`` sitting at position ``offset + j``.
        Returns a tensor of the same shape and dtype.
        """
        n_ctx = x.shape[1]
        cos, sin = self.tables(offset + n_ctx, x.device, x.dtype)
        cos, sin = cos[offset:, None, :], sin[offset:, None, :]
        return x * cos + rotate_half(x) * sin

    def __repr__(self) -> str:
        return f"RotaryEmbedding(head_dim={self.head_dim}, theta={self.theta:g})"
