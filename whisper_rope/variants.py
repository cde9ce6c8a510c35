"""Positional-embedding variants: parsing, validation, presets.

A variant is written ``ENCODER/DECODER``; each side is one scheme or a ``+``-joined set of schemes, e.g.
``rotary+sinusoidal/learned``. The canonical spelling lists the rotary scheme first, then the table, so that
``sinusoidal+rotary`` and ``rotary+sinusoidal`` name the same model.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .errors import VariantError

#: What each side accepts. The value says which absolute table the scheme adds (None: no table) and whether
#: self-attention is rotated. Keep in sync with the scheme table in README.md.
ENCODER_SCHEMES: Dict[str, Tuple[Optional[str], bool]] = {
    "sinusoidal": ("sinusoidal", False),
    "rotary": (None, True),
    "rotary+sinusoidal": ("sinusoidal", True),
}
DECODER_SCHEMES: Dict[str, Tuple[Optional[str], bool]] = {
    "learned": ("learned", False),
    "sinusoidal": ("sinusoidal", False),
    "learned-sinusoidal": ("learned-sinusoidal", False),
    "rotary": (None, True),
    "rotary+sinusoidal": ("sinusoidal", True),
    "rotary+learned": ("learned", True),
}

#: Preset name -> canonical variant. ``whisper`` is upstream Whisper, bit for bit.
PRESETS: Dict[str, str] = {
    "whisper": "sinusoidal/learned",
    "rotary": "rotary/rotary",
    "rotary/sinusoidal": "rotary/sinusoidal",
    "rotary/rotary+sinusoidal": "rotary/rotary+sinusoidal",
    "rotary/learned-sinusoidal": "rotary/learned-sinusoidal",
}

#: Upstream Whisper's own variant: the variant of checkpoints without a "variant" entry, and the only one the
#: Hugging Face format can represent.
UPSTREAM_VARIANT = PRESETS["whisper"]


@dataclass(frozen=True)
class SideScheme:
    """How positions enter one side (encoder or decoder).

    table: the absolute table added to the input (``sinusoidal``, ``learned``, ``learned-sinusoidal``) or None.
    rotary: whether self-attention queries and keys are rotated (RoPE).
    """

    name: str
    table: Optional[str]
    rotary: bool


@dataclass(frozen=True)
class Variant:
    """A parsed ``ENCODER/DECODER`` variant."""

    encoder: SideScheme
    decoder: SideScheme

    @property
    def name(self) -> str:
        """The canonical ``ENCODER/DECODER`` string."""
        return f"{self.encoder.name}/{self.decoder.name}"

    @property
    def uses_rotary(self) -> bool:
        return self.encoder.rotary or self.decoder.rotary

    @property
    def encoder_has_table(self) -> bool:
        """Whether the encoder adds an absolute table (and therefore needs exactly ``n_audio_ctx`` frames)."""
        return self.encoder.table is not None

    def __str__(self) -> str:
        return self.name


def available_variants() -> List[str]:
    """The preset names, upstream's ``whisper`` first."""
    return list(PRESETS)


def _canonical_side(text: str) -> str:
    parts = [p.strip() for p in text.split("+") if p.strip()]
    # rotary first, then the table: one spelling per model.
    parts.sort(key=lambda p: (p != "rotary", p))
    return "+".join(parts)


def _valid_schemes_message() -> str:
    return (
        f"valid encoder schemes: {', '.join(ENCODER_SCHEMES)}; "
        f"valid decoder schemes: {', '.join(DECODER_SCHEMES)}; "
        f"presets: {', '.join(PRESETS)}"
    )


def parse_variant(text: "str | Variant") -> Variant:
    """Parse a preset name or an ``ENCODER/DECODER`` string.

    Raises:
        VariantError: (a ``ValueError``) naming the bad part and listing the valid schemes per side.
    """
    if isinstance(text, Variant):
        return text
    if not isinstance(text, str) or not text.strip():
        raise VariantError(f"variant must be a non-empty string; {_valid_schemes_message()}")
    spec = PRESETS.get(text.strip(), text.strip())
    if spec.count("/") != 1:
        raise VariantError(
            f"unknown variant {text!r}: expected a preset or ENCODER/DECODER; {_valid_schemes_message()}"
        )
    encoder_text, decoder_text = (_canonical_side(side) for side in spec.split("/"))
    if encoder_text not in ENCODER_SCHEMES:
        raise VariantError(f"invalid encoder scheme {encoder_text!r} in variant {text!r}; {_valid_schemes_message()}")
    if decoder_text not in DECODER_SCHEMES:
        raise VariantError(f"invalid decoder scheme {decoder_text!r} in variant {text!r}; {_valid_schemes_message()}")
    return Variant(
        encoder=SideScheme(encoder_text, *ENCODER_SCHEMES[encoder_text]),
        decoder=SideScheme(decoder_text, *DECODER_SCHEMES[decoder_text]),
    )
