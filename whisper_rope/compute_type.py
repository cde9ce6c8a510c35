"""Compute types: the precision a loaded model runs in, named as faster-whisper (CTranslate2) names them.

============================  =================================================================  ===========
name                          what runs                                                          device
============================  =================================================================  ===========
``default``, ``float32``      fp32 weights and activations: upstream's numerics, bit for bit     any
``int8``, ``int8_float32``    every ``Linear`` of encoder and decoder *and* the output           CPU
                              projection (the 51864-wide product with the token embedding) in
                              int8; decoding's cross-attention onto bfloat16 keys and values
                              (see below); everything else (convs, layer norms, other
                              attention, embedding lookups) in fp32
``auto``                      ``int8`` on the CPU, ``float32`` elsewhere                         any
============================  =================================================================  ===========

The other names faster-whisper accepts (``float16``, ``bfloat16``, ``int8_float16``, ``int8_bfloat16``, ``int16``)
are refused in one line: half precision stays upstream's ``fp16`` decoding option (fp32 weights cast per call on
CUDA), and PyTorch's int8 kernels used here exist for the CPU only.

Kernels: PyTorch's own dynamic quantization, ``quantized::linear_dynamic`` (fbgemm on x86 CPUs, the ``x86``
quantized engine): weights quantised once, symmetric per output channel; activations quantised per call, one
scale per tensor, products accumulated in int32 and returned in fp32. The output projection is not an ``nn.Linear``
upstream (``h @ token_embedding.weight.T``), so the decoder gets an `Int8Linear` of the tied embedding as its
``output_projection``; the embedding itself stays fp32 for token lookups. On one decoding step of tiny.en that
projection streams 20 MB instead of 80 MB.

Cross-attention in int8 decoding: each decoding step reads every clip's audio keys and values (tiny.en: 4 layers x
2 x 1500 x 384 fp32 = 18 MB per clip), through a strided per-head view in upstream's cache layout; that read was the
largest cost of a step. With int8 the decoder caches them once per clip heads-major (`model.cache_audio_heads`) in
bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; float32 elsewhere): queries times keys and
weights times values run in bfloat16 (products rounded to bfloat16), the softmax in fp32.

PyTorch has marked these quantized-tensor kernels deprecated in favour of torchao, whose int8 paths run 20-40x
slower than fp32 on this CPU without ``torch.compile`` (benchmarks/README.md); the tests exercise these kernels, so
their removal fails loudly.

Because an activation scale covers a whole call, a clip decoded in a batch sees slightly different rounding than the
same clip decoded alone (fp32 batches give the same tokens; int8 batches may, rarely, not).

An int8 model holds no fp32 ``Linear`` weights: it cannot be trained or saved (`save_checkpoint` refuses it).
"""

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .model import WhisperRope

FLOAT32 = "float32"
INT8 = "int8"
# Accepted names and what each resolves to ("auto" depends on the device).
_ALIASES = {"default": FLOAT32, "float32": FLOAT32, "int8": INT8, "int8_float32": INT8}
_REFUSED = {
    "float16": "half precision is upstream's fp16 decoding option (--fp16 True, on CUDA), with fp32 weights",
    "bfloat16": "whisper_rope runs fp32 or int8 weights",
    "int8_float16": "PyTorch's int8 kernels used here run on the CPU only, in fp32 around the int8 products",
    "int8_bfloat16": "PyTorch's int8 kernels used here run on the CPU only, in fp32 around the int8 products",
    "int16": "whisper_rope runs fp32 or int8 weights",
}
COMPUTE_TYPES: Tuple[str, ...] = ("default", "auto", "float32", "int8", "int8_float32")


def resolve_compute_type(compute_type: str, device: "str | torch.device") -> str:
    """``float32`` or ``int8`` for a compute-type name on a device; a ValueError names an unsupported combination."""
    device = torch.device(device)
    if compute_type == "auto":
        return INT8 if device.type == "cpu" else FLOAT32
    if compute_type in _REFUSED:
        raise ValueError(
            f"compute_type {compute_type!r} is not supported ({_REFUSED[compute_type]}); "
            f"use one of {', '.join(COMPUTE_TYPES)}"
        )
    if compute_type not in _ALIASES:
        raise ValueError(f"unknown compute_type {compute_type!r}; expected one of {', '.join(COMPUTE_TYPES)}")
    resolved = _ALIASES[compute_type]
    if resolved == INT8 and device.type != "cpu":
        raise ValueError(
            f"compute_type {compute_type!r} runs on the CPU only (PyTorch's dynamic int8 kernels), not on {device}"
        )
    return resolved


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` with ``weight`` in int8 (symmetric, one scale per output row) and ``x`` quantised to
    8 bits per call; int32 accumulation, fp32 result.

    weight: (out_features, in_features); bias: (out_features,) or None. x: (..., in_features) ->
    (..., out_features) in x's dtype. The packed weight is no parameter or buffer: it never enters a state dict.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        weight = weight.detach().float().cpu()
        self.out_features, self.in_features = weight.shape
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # PyTorch marks quantized-tensor creation deprecated (module docstring); the packed weight is all we keep.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
            quantised = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(quantised, None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        # reduce_range=True: 7-bit activations, the setting PyTorch uses for x86 dynamic quantization, so that the
        # u8 x s8 pair sums of the fbgemm kernels cannot saturate on CPUs without VNNI.
        flat = x.reshape(-1, self.in_features).float()
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, True)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def audio_kv_dtype() -> torch.dtype:
    """The dtype int8 decoding caches cross-attention keys and values in: bfloat16 where the CPU multiplies it
    natively (AVX512-BF16 or AMX), else float32 (half the bytes would then cost emulated products)."""
    native = [
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return torch.bfloat16 if any(native) else torch.float32


def quantize_int8(model: WhisperRope) -> WhisperRope:
    """Replace, in place, every ``nn.Linear`` of ``model`` and its output projection by `Int8Linear` (CPU).

    Returns ``model``, now in eval mode with ``compute_type == "int8"``.
    """
    if model.device.type != "cpu":
        raise ValueError(f"int8 compute runs on the CPU only; the model is on {model.device}")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    model.decoder.output_projection = Int8Linear(model.decoder.token_embedding.weight)
    model.decoder.audio_kv_dtype = audio_kv_dtype()
    model.compute_type = INT8
    return model.eval().requires_grad_(False)


def apply_compute_type(model: WhisperRope, compute_type: str) -> WhisperRope:
    """Run ``model`` in ``compute_type`` (see the module docstring), on the device it is on. Returns the model."""
    if resolve_compute_type(compute_type, model.device) == INT8:
        return quantize_int8(model)
    return model
