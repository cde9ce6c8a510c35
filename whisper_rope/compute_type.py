"""Compute types: the precision a loaded model runs in, named as faster-whisper (CTranslate2) names them.

============================  =================================================================  ===========
name                          what runs                                                          device
============================  =================================================================  ===========
``default``, ``float32``      fp32 weights and activations: upstream's numerics, bit for bit     any
``int8``, ``int8_float32``    every ``Linear`` of encoder and decoder *and* the output           CPU
                              projection (the 51864-wide product with the token embedding) in
                              int8, but the encoder's first self-attention (`float32_linears`);
                              decoding's cross-attention onto bfloat16 keys and values (see
                              below); everything else (convs, layer norms, other attention,
                              embedding lookups) in fp32
``auto``                      ``int8`` on the CPU, ``float32`` elsewhere                         any
============================  =================================================================  ===========

`load_model` defaults to ``default`` (upstream's numerics); the commands that load a model (``transcribe``,
``evaluate``, through `LoadOptions`) default to ``auto``, as faster-whisper does (benchmarks/README.md, "Defaults:
int8 against float32 by length bucket").

The other names faster-whisper accepts (``float16``, ``bfloat16``, ``int8_float16``, ``int8_bfloat16``, ``int16``)
are refused in one line: half precision stays upstream's ``fp16`` decoding option (fp32 weights cast per call on
CUDA), and PyTorch's int8 kernels used here exist for the CPU only.

Kernels: PyTorch's own dynamic quantization, ``quantized::linear_dynamic`` (fbgemm on x86 CPUs, the ``x86``
quantized engine): weights quantised once, symmetric per output channel; activations quantised per call to 8 bits
on CPUs with VNNI (7 elsewhere, see `activation_bits`), products accumulated in int32 and returned in fp32. The
kernel gives a call one activation scale; `Int8Linear` makes that one scale per row (see "Activation scales"
below). The output
projection is not an ``nn.Linear`` upstream (``h @ token_embedding.weight.T``), so the decoder gets an `Int8Linear`
of the tied embedding as its ``output_projection``; the embedding itself stays for token lookups (in float16 where
that holds it exactly: `narrow_lookup_table`). On one decoding step of tiny.en that projection streams 20 MB instead
of 80 MB.

Cross-attention in int8 decoding: each decoding step reads every clip's audio keys and values (tiny.en: 4 layers x
2 x 1500 x 384 fp32 = 18 MB per clip); in upstream's cache layout that read is a strided per-head view and the
largest cost of a step. So with int8 (the model's ``settings.audio_kv_dtype``) the decoder caches them once per clip
heads-major (`model.cache_audio_heads`) in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX;
float32 elsewhere): queries times keys and weights times values run in bfloat16 (products rounded to bfloat16), the
softmax in fp32.

PyTorch has marked these quantized-tensor kernels deprecated in favour of torchao, whose int8 paths, without
``torch.compile``, run many times slower than these kernels on the benchmark's CPU (benchmarks/README.md, "Kernels
considered for int8"); the tests exercise these kernels, so their removal fails loudly.

Activation scales: the kernel rounds a call's activations on one grid, set by their largest magnitude. Shared by a
batch, that grid would make a recording's transcript depend on the recordings batched with it; shared by a clip, it
rounds every audio position on the grid of the clip's largest outlier (in tiny.en's last encoder layer the MLP
down-projection's post-GELU input peaks at 559 at one position of a clip where the median position's peak is 14).
So, like CTranslate2, every layer scales each row (token, audio position) on its own: a clip's int8 result does not
depend on its batch (design invariant 10), and the encoder's output is as close to fp32 as CTranslate2's int8
encoder's (benchmarks/README.md, "Where int8's error was"). The encoder takes a batch's clips one at a time
(`mark_int8` says why), each at its own frames.

An int8 model holds most of its ``Linear`` weights only in int8: it cannot be trained or saved (`save_checkpoint`
refuses it).
"""

import warnings
from typing import List, Optional, Tuple

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


# Inputs with at least this many elements are scaled row by row without temporaries of their own size (below).
_LARGE_INPUT = 1 << 15


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` with ``weight`` in int8 (symmetric, one scale per output row) and ``x`` quantised to
    `activation_bits` with one scale per row; int32 accumulation, fp32 result.

    weight: (out_features, in_features); bias: (out_features,) or None. x: (..., in_features) ->
    (..., out_features) in x's dtype. The packed weight is no parameter or buffer: it never enters a state dict.

    One scale per row (a token in the decoder, an audio position in the encoder), as CTranslate2 quantises: a row's
    result does not depend on the other rows of a batch, and a row with small values is not rounded on the grid of
    another row's outliers (the encoder's MLP down-projection sees post-GELU rows whose peaks differ 40x in a clip).
    The kernel has one scale per call: each row is divided by its largest magnitude before it, a fixed row holding
    1 and -1 is appended so that the kernel's scale covers [-1, 1] in every call, and the result is multiplied back.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__()
        weight = weight.detach().float().cpu()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # PyTorch marks quantized-tensor creation deprecated (module docstring); the packed weight is all we keep.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
            quantised = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self._set_weight(quantised, bias)

    @classmethod
    def from_int8(cls, values: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> "Int8Linear":
        """The layer whose weight is ``values`` (int8, (out_features, in_features)) times ``scales`` (float64,
        (out_features,)) per row, as `int8_weight` returns them: the same layer, bit for bit, without quantising."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        zero_points = torch.zeros(values.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
            quantised = torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)
        layer._set_weight(quantised, bias)
        return layer

    def _set_weight(self, quantised: Tensor, bias: Optional[Tensor]) -> None:
        """Pack a per-row qint8 weight (out_features, in_features) for the kernel."""
        self.out_features, self.in_features = quantised.shape
        # The bias is added after the rescaling (`torch.addcmul`), so the kernel gets none.
        self._packed = torch.ops.quantized.linear_prepack(quantised, None)
        self._bias = None if bias is None else bias.detach().float().cpu()
        self._reduce_range = activation_bits() == 7
        self._pin = torch.zeros(1, self.in_features)
        self._pin[0, :2] = torch.tensor([1.0, -1.0])

    @property
    def bias(self) -> Optional[Tensor]:
        """(out_features,) fp32, or None."""
        return self._bias

    def int8_weight(self) -> Tuple[Tensor, Tensor]:
        """The weight as stored: its int8 values (out_features, in_features) and each row's scale (out_features,)
        float64; `from_int8` rebuilds the layer from them."""
        quantised, _ = torch.ops.quantized.linear_unpack(self._packed)
        return quantised.int_repr(), quantised.q_per_channel_scales()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).float()
        peak, scaled = self._scaled_rows(flat)
        out = torch.ops.quantized.linear_dynamic(scaled, self._packed, self._reduce_range)[: flat.shape[0]]
        out = out.mul_(peak) if self._bias is None else torch.addcmul(self._bias, out, peak)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _scaled_rows(self, flat: Tensor) -> Tuple[Tensor, Tensor]:
        """(rows, in_features) -> each row's peak magnitude (rows, 1) and the rows divided by it, with the pin row
        appended: (rows + 1, in_features)."""
        if flat.numel() < _LARGE_INPUT:  # decoding steps: the fewest operations
            peak = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # 9x faster than vector_norm(ord=inf)
            return peak, torch.cat([flat / peak, self._pin])
        # Many rows (an encoder's, or the audio under cross-attention's keys and values): a fresh temporary of this
        # size (an abs, a quotient, a concatenation) costs more than the arithmetic, since large allocations come
        # from the OS page by page; this way takes half the time at 1500 x 384.
        rows = flat.shape[0]
        peak = torch.maximum(flat.amax(dim=1, keepdim=True), flat.amin(dim=1, keepdim=True).neg_()).clamp_(min=1e-30)
        scaled = flat.new_empty(rows + 1, self.in_features)
        torch.div(flat, peak, out=scaled[:rows])
        scaled[rows] = self._pin[0]
        return peak, scaled

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


def activation_bits() -> int:
    """Bits of an int8 layer's quantised activations: 8 where the CPU has VNNI, whose instruction sums u8 x s8
    products straight into int32; 7 elsewhere (PyTorch's ``reduce_range`` for x86), where fbgemm adds pairs of
    products in int16 first, which full 8-bit activations could saturate.

    On tiny.en the two differ by at most half a point of WER (benchmarks/README.md)."""
    return 8 if getattr(torch.cpu, "_is_vnni_supported", lambda: False)() else 7


def audio_kv_dtype() -> torch.dtype:
    """The dtype int8 decoding caches cross-attention keys and values in: bfloat16 where the CPU multiplies it
    natively (AVX512-BF16 or AMX), else float32 (half the bytes would then cost emulated products)."""
    native = [
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return torch.bfloat16 if any(native) else torch.float32


def float32_linears(model: WhisperRope) -> List[nn.Module]:
    """The ``Linear`` layers an int8 model keeps in fp32: the projections (query, key, value, out) of the encoder's
    first self-attention.

    Their error is carried through every later layer, and they carry more of it than their share of the work: at 8 %
    of the encoder's Linear multiply-adds, keeping them in fp32 cuts the int8 encoder's output error by a fifth for
    tiny.en (to 2.3 % relative, below CTranslate2's int8 encoder's 2.9 %) and by two fifths for base, for 4 % more
    encoder time; no other set of layers of that cost does as well (benchmarks/README.md, "The layers kept in fp32").
    """
    blocks = model.encoder.blocks
    return [child for child in blocks[0].attn.children() if isinstance(child, nn.Linear)] if len(blocks) else []


def quantize_int8(model: WhisperRope) -> WhisperRope:
    """Replace, in place, every ``nn.Linear`` of ``model`` but `float32_linears`, and its output projection, by
    `Int8Linear` (CPU).

    Returns ``model``, in eval mode with ``compute_type == "int8"``.
    """
    if model.device.type != "cpu":
        raise ValueError(f"int8 compute runs on the CPU only; the model is on {model.device}")
    for name in int8_layer_names(model):
        if name == OUTPUT_PROJECTION:
            model.decoder.output_projection = Int8Linear(model.decoder.token_embedding.weight)
        else:
            linear = model.get_submodule(name)
            set_submodule(model, name, Int8Linear(linear.weight, linear.bias))
    narrow_lookup_table(model.decoder.token_embedding)
    return mark_int8(model)


def narrow_lookup_table(embedding: nn.Embedding) -> None:
    """Keep the token embedding of an int8 model, which it only looks tokens up in (its products with the vocabulary
    run on `OUTPUT_PROJECTION`), in float16 where float16 holds its values exactly, as upstream's checkpoints store
    them: a lookup then enters the decoder's fp32 sums with the same values, from half the memory (tiny.en: 40 of
    its 80 MB)."""
    weight = embedding.weight.detach()
    half = weight.half()
    if weight.dtype == torch.float32 and torch.equal(half.float(), weight):
        embedding.weight = nn.Parameter(half, requires_grad=False)


#: The name `quantize_int8` gives the decoder's int8 output projection (the tied token embedding's int8 copy).
OUTPUT_PROJECTION = "decoder.output_projection"


def int8_layer_names(model: WhisperRope) -> List[str]:
    """The modules `quantize_int8` makes `Int8Linear`: every ``nn.Linear`` but `float32_linears`, by name, and
    `OUTPUT_PROJECTION`."""
    kept = float32_linears(model)
    names = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module not in kept
    ]  # modules compare by identity
    return names + [OUTPUT_PROJECTION]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``, in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def mark_int8(model: WhisperRope) -> WhisperRope:
    """Set what an int8 model does besides its `Int8Linear` layers (they are in place): returns ``model``, in eval
    mode with ``compute_type == "int8"``."""
    # Per-row scales make a clip's int8 result its own whatever the batch, so the encoder may as well take clips one
    # at a time: a batch of 8 30-s windows then never builds temporaries of 10-70 MB, whose fresh pages cost more
    # than the arithmetic on them (benchmarks/README.md).
    model.configure(audio_kv_dtype=audio_kv_dtype(), one_clip_per_call=True)
    model.compute_type = INT8
    return model.eval().requires_grad_(False)


def apply_compute_type(model: WhisperRope, compute_type: str) -> WhisperRope:
    """Run ``model`` in ``compute_type`` (see the module docstring), on the device it is on. Returns the model."""
    if resolve_compute_type(compute_type, model.device) == INT8:
        return quantize_int8(model)
    return model
