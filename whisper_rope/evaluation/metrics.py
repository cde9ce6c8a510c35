"""Word and character error rates, with upstream Whisper's text normalisers.

``normalizer_for(language)`` picks upstream's ``EnglishTextNormalizer`` for English (spelling, numbers and
contractions standardised) and ``BasicTextNormalizer`` otherwise (case, punctuation and symbols removed).
``error_rates(references, hypotheses)`` aligns them with ``jiwer`` and returns corpus-level counts.
"""

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence

from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer
from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

Normalizer = Callable[[str], str]

_NORMALIZERS: Dict[str, Normalizer] = {}


def normalizer_for(language: Optional[str]) -> Normalizer:
    """Upstream's text normaliser for a language code or name (``"en"``, ``"English"``, ``"de"``, ...).

    English gets ``EnglishTextNormalizer``; any other language, and ``None`` (unknown), ``BasicTextNormalizer``.
    Instances are cached: the English one reads a spelling table on construction.
    """
    code = (language or "").strip().lower()
    code = TO_LANGUAGE_CODE.get(code, code)
    if code and code not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}: expected a Whisper language code (en, de, ...) or name")
    kind = "english" if code == "en" else "basic"
    if kind not in _NORMALIZERS:
        _NORMALIZERS[kind] = EnglishTextNormalizer() if kind == "english" else BasicTextNormalizer()
    return _NORMALIZERS[kind]


@dataclass
class ErrorRates:
    """Corpus-level edit counts between references and hypotheses.

    wer: (substitutions + deletions + insertions) / n_words. When the references hold no words at all, the
        denominator is one, so the WER counts inserted words (0.0 when the hypotheses are empty too).
    cer: the same over characters (spaces between words included), with ``n_chars`` reference characters.
    substitutions, deletions, insertions, hits: word-level counts; ``n_words = hits + substitutions + deletions``.
    """

    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    n_words: int
    n_chars: int
    n_utterances: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], normalizer: Optional[Normalizer] = None
) -> ErrorRates:
    """Align each reference with its hypothesis and sum the edits over the corpus.

    Args:
        references, hypotheses: one string per utterance, in the same order; empty strings are allowed (an empty
            reference makes every hypothesis word an insertion; an empty hypothesis deletes every reference word).
        normalizer: applied to both sides first (e.g. ``normalizer_for("en")``); None compares the strings as given,
            split on whitespace.

    Raises:
        ValueError: the two sequences differ in length.
    """
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(
            f"error_rates needs one hypothesis per reference: got {len(references)} references and "
            f"{len(hypotheses)} hypotheses"
        )
    if normalizer is not None:
        references = [normalizer(text) for text in references]
        hypotheses = [normalizer(text) for text in hypotheses]
    # jiwer's default transforms split on whitespace; collapsing it first makes character counts independent of
    # how many spaces a normaliser leaves between words.
    references = [" ".join(text.split()) for text in references]
    hypotheses = [" ".join(text.split()) for text in hypotheses]
    if not references:
        return ErrorRates(0.0, 0.0, 0, 0, 0, 0, 0, 0, 0)

    import jiwer

    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    word_errors = words.substitutions + words.deletions + words.insertions
    char_errors = chars.substitutions + chars.deletions + chars.insertions
    return ErrorRates(
        wer=word_errors / max(n_words, 1),
        cer=char_errors / max(n_chars, 1),
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
        hits=words.hits,
        n_words=n_words,
        n_chars=n_chars,
        n_utterances=len(references),
    )
