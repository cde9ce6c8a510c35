"""Word and character error rates, with upstream Whisper's text normalisers.

``normalizer_for(language)`` picks upstream's ``EnglishTextNormalizer`` for English (spelling, numbers and
contractions standardised) and ``BasicTextNormalizer`` otherwise (case, punctuation and symbols removed).
``error_rates(references, hypotheses)`` aligns them with ``jiwer`` and returns corpus-level counts;
``length_buckets(rows)`` splits per-utterance results by clip length (`LENGTH_BUCKETS`) and ``length_bucket_table``
shows the buckets of one or more models side by side.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

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
    counts = {name: getattr(words, name) for name in ("substitutions", "deletions", "insertions", "hits")}
    rates = {"wer": word_errors / max(n_words, 1), "cer": char_errors / max(n_chars, 1)}
    return ErrorRates(**rates, **counts, n_words=n_words, n_chars=n_chars, n_utterances=len(references))


#: Length buckets of the per-length report: (name, longest clip in seconds, inclusive). A clip belongs to the first
#: bucket whose limit it does not exceed; ``> 30 s`` holds the long recordings (decoded window by window).
LENGTH_BUCKETS = (("≤ 5 s", 5.0), ("5–10 s", 10.0), ("10–20 s", 20.0), ("20–30 s", 30.0), ("> 30 s", math.inf))


@dataclass
class LengthBucket:
    """The scores of the utterances of one length bucket.

    wer: (substitutions + deletions + insertions) / n_words over the bucket's utterances (None when their
    references hold no words); n_capped: hypotheses that reached their decoding-length cap (loops cut short).
    """

    bucket: str
    clips: int
    seconds: float
    n_words: int
    errors: int
    wer: Optional[float]
    n_capped: int


def length_bucket(seconds: float) -> str:
    """The name of the `LENGTH_BUCKETS` bucket that a clip of ``seconds`` belongs to."""
    return next(name for name, limit in LENGTH_BUCKETS if seconds <= limit)


def length_buckets(rows: Sequence[Any]) -> List[LengthBucket]:
    """Per non-empty length bucket, in bucket order, the scores of ``rows``: per-utterance results with
    ``seconds``, ``substitutions``, ``deletions``, ``insertions``, ``n_words`` and ``capped``.

    Each utterance is aligned on its own, so summing their edits gives the bucket's corpus WER.
    """
    grouped: Dict[str, List[Any]] = {}
    for row in rows:
        grouped.setdefault(length_bucket(row.seconds), []).append(row)
    buckets = []
    for name, _ in LENGTH_BUCKETS:
        members = grouped.get(name, [])
        if not members:
            continue
        words = sum(row.n_words for row in members)
        errors = sum(row.substitutions + row.deletions + row.insertions for row in members)
        buckets.append(
            LengthBucket(
                bucket=name,
                clips=len(members),
                seconds=round(sum(row.seconds for row in members), 2),
                n_words=words,
                errors=errors,
                wer=errors / words if words else None,
                n_capped=sum(bool(row.capped) for row in members),
            )
        )
    return buckets


def length_bucket_table(columns: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A Markdown table with a row per length bucket: its clips and seconds, then the WER and capped count of each
    column (a model, a decoding; a capped count may be a mean over seeds).

    columns: column name -> that column's buckets as plain data (`LengthBucket` fields, e.g. from JSON); a bucket
    missing from a column shows as "–". Clips and seconds come from the first column holding the bucket. Rows follow
    `LENGTH_BUCKETS`, then buckets of other names (e.g. another decoding of the long recordings) as first met.
    """
    names = list(columns)
    header = ["length", "clips", "seconds"]
    header += [f"{name} {what}".strip() for name in names for what in ("WER %", "capped")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_column = [{bucket["bucket"]: bucket for bucket in columns[name]} for name in names]
    names_in_order = [name for name, _ in LENGTH_BUCKETS]
    names_in_order += [name for buckets in by_column for name in buckets if name not in names_in_order]
    for bucket_name in dict.fromkeys(names_in_order):
        present = [buckets[bucket_name] for buckets in by_column if bucket_name in buckets]
        if not present:
            continue
        cells = [bucket_name, str(present[0]["clips"]), f"{present[0]['seconds']:.1f}"]
        for buckets in by_column:
            bucket = buckets.get(bucket_name)
            if bucket is None:
                cells += ["–", "–"]
                continue
            wer = "–" if bucket["wer"] is None else f"{100 * bucket['wer']:.1f}"
            cells += [wer, f"{bucket['n_capped']:g}/{bucket['clips']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
