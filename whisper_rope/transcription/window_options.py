"""Upstream ``transcribe``'s keywords turned into what one decoding of a window takes: its `DecodingOptions` and the
dtype of its mel. Shared by `transcribe` (batched first windows) and `longform` (batched speech chunks)."""

import inspect
from typing import Any, Dict

import torch
from whisper.decoding import DecodingOptions
from whisper.tokenizer import get_tokenizer
from whisper.transcribe import transcribe as upstream_transcribe

from ..model import WhisperRope

# Options of upstream `transcribe` itself; every other keyword goes to `DecodingOptions`, as upstream does it.
TRANSCRIBE_OPTIONS = frozenset(
    name for name, p in inspect.signature(upstream_transcribe).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def transcribe_dtype(model: WhisperRope, fp16: bool) -> torch.dtype:
    """Upstream `transcribe`'s choice: fp16 unless asked otherwise, never on the CPU."""
    return torch.float16 if fp16 and model.device != torch.device("cpu") else torch.float32


def window_decoding_options(model: WhisperRope, language: str, options: Dict[str, Any]) -> DecodingOptions:
    """The `DecodingOptions` with which upstream `transcribe` decodes a window at ``options["temperature"]`` (its
    first value when a sequence): the decoding keywords, fp32 on the CPU, the initial prompt, and beam search only at
    temperature 0 (best-of-n only above it)."""
    decode_options = {k: v for k, v in options.items() if k not in TRANSCRIBE_OPTIONS}
    if transcribe_dtype(model, decode_options.get("fp16", True)) == torch.float32:
        decode_options["fp16"] = False
    decode_options["language"] = language
    prompt = options.get("initial_prompt")
    if prompt is None:
        decode_options["prompt"] = []
    else:
        tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=decode_options.get("task", "transcribe"),
        )
        decode_options["prompt"] = tokenizer.encode(" " + prompt.strip())
    temperature = options.get("temperature", (0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    first = temperature if isinstance(temperature, (int, float)) else temperature[0]
    if first > 0:
        decode_options.pop("beam_size", None)
        decode_options.pop("patience", None)
    else:
        decode_options.pop("best_of", None)
    return DecodingOptions(**decode_options, temperature=first)
