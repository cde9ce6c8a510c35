"""Packed unpadded sequences: the clips of a batch laid end to end in one sequence, each attending only to itself.

Unpadded training zero-pads every clip to the batch's longest and masks the padding out of self-attention. The mask
costs twice: every linear layer still runs on the padding positions, and an explicit mask keeps attention off the
fused kernels that take none (on GPUs, flash attention). Packed, a batch of clips with ``n_1 .. n_b`` positions is
one sequence of ``n_1 + ... + n_b`` positions: linear layers see no padding, and attention is block-diagonal (each
clip's block attends to itself), computed by

* ``torch.nn.attention.varlen.varlen_attn`` on CUDA in fp16/bf16: one fused variable-length flash-attention call
  for the whole batch, given the blocks' offsets (``cu_seqlens``);
* elsewhere (the CPU, fp32), one unmasked ``scaled_dot_product_attention`` per clip, which runs PyTorch's fused
  flash kernel for the CPU. ``varlen_attn`` has no CPU kernel, nested (jagged) tensors fall back to the unfused
  math kernel on the CPU, and flex attention needs ``torch.compile``; benchmarks/README.md has the measurements.

Within a clip, RoPE rotates each position by its place in that clip (`PackedClips.positions`), so a packed clip is
computed exactly as the same clip alone or masked in a padded batch (up to summation order).
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def varlen_kernel() -> Optional[Callable[..., Tensor]]:
    """``torch.nn.attention.varlen.varlen_attn``, imported on first use: importing it imports ``torch._dynamo``,
    which more than doubles the start-up time of a process that only transcribes. None before torch 2.9, which has
    no variable-length attention (every device then takes the per-clip path)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass(frozen=True)
class PackedClips:
    """The layout of ``b`` clips packed into one sequence of ``total`` positions.

    lengths: (b,) int64 positions of each clip; offsets: (b + 1,) int32, where each clip starts (``cu_seqlens``);
    positions: (total,) int64, each packed position's index within its clip; max_length: the longest clip.
    """

    lengths: Tensor
    offsets: Tensor
    positions: Tensor
    max_length: int

    @classmethod
    def from_lengths(cls, lengths: Tensor) -> "PackedClips":
        """lengths: (b,) positions per clip, each at least 1."""
        lengths = lengths.to(torch.int64)
        if lengths.ndim != 1 or lengths.numel() == 0 or int(lengths.min()) < 1:
            raise ValueError(f"packed clips need a 1-d tensor of positive lengths, got {lengths.tolist()}")
        offsets = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        starts = torch.repeat_interleave(offsets[:-1].to(torch.int64), lengths)
        positions = torch.arange(int(offsets[-1]), device=lengths.device) - starts
        return cls(lengths, offsets, positions, int(lengths.max()))

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def pack(self, x: Tensor) -> Tensor:
        """(b, n, d) zero-padded clips -> (1, total, d), each clip's first ``lengths[i]`` positions in order."""
        real = torch.arange(x.shape[1], device=x.device)[None, :] < self.lengths.to(x.device)[:, None]
        return x[real][None]

    def unpack(self, x: Tensor, n: int) -> Tensor:
        """(1, total, d) -> (b, n, d), zeros after each clip's positions (``n`` at least ``max_length``)."""
        real = torch.arange(n, device=x.device)[None, :] < self.lengths.to(x.device)[:, None]
        out = x.new_zeros(len(self.lengths), n, x.shape[-1])
        return out.masked_scatter(real[..., None], x[0])


def block_diagonal_attention(q: Tensor, k: Tensor, v: Tensor, clips: PackedClips) -> Tensor:
    """Each packed clip's queries attend to its own keys only, without a mask.

    q, k, v: (total, n_head, head_dim). Returns (total, n_head, head_dim).
    """
    kernel = varlen_kernel() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if kernel is not None:
        offsets = clips.offsets.to(q.device)
        return kernel(q, k, v, offsets, offsets, clips.max_length, clips.max_length)
    heads = [t.transpose(0, 1) for t in (q, k, v)]  # (n_head, total, head_dim)
    bounds = clips.offsets.tolist()
    blocks = [
        F.scaled_dot_product_attention(*(t[:, start:end] for t in heads)) for start, end in zip(bounds, bounds[1:])
    ]
    return torch.cat(blocks, dim=1).transpose(0, 1)
