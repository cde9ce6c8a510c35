"""Error rates and normaliser choice (whisper_rope.evaluation.metrics)."""

import pytest
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from whisper_rope.evaluation.metrics import error_rates, normalizer_for


def test_normalizer_for_picks_upstream_english_or_basic_normaliser():
    assert isinstance(normalizer_for("en"), EnglishTextNormalizer)
    assert isinstance(normalizer_for("English"), EnglishTextNormalizer)
    assert isinstance(normalizer_for("de"), BasicTextNormalizer)
    assert isinstance(normalizer_for(None), BasicTextNormalizer)
    assert normalizer_for("en") is normalizer_for("english")  # cached
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        normalizer_for("klingon")


def test_error_rates_counts_substitutions_deletions_insertions_over_the_corpus():
    rates = error_rates(["the cat sat", "hello world"], ["the cat sit down", ""])
    assert (rates.substitutions, rates.deletions, rates.insertions, rates.hits) == (1, 2, 1, 2)
    assert rates.n_words == 5
    assert rates.wer == pytest.approx(4 / 5)
    assert rates.n_utterances == 2
    assert rates.n_chars == len("the cat sat") + len("hello world")


def test_character_error_rate_counts_character_edits():
    rates = error_rates(["abc"], ["abd"])
    assert rates.cer == pytest.approx(1 / 3)
    assert rates.wer == pytest.approx(1.0)


def test_empty_references_count_inserted_words_and_empty_pairs_are_perfect():
    inserted = error_rates([""], ["two words"])
    assert (inserted.n_words, inserted.insertions, inserted.wer) == (0, 2, 2.0)
    assert error_rates([""], [""]).wer == 0.0
    assert error_rates([], []).n_utterances == 0
    deleted = error_rates(["a b c"], [""])
    assert (deleted.deletions, deleted.wer, deleted.cer) == (3, 1.0, 1.0)
    mixed = error_rates(["", "a b"], ["x", "a b"])
    assert (mixed.n_words, mixed.insertions, mixed.hits) == (2, 1, 2)
    assert mixed.wer == pytest.approx(0.5)


def test_normaliser_removes_case_punctuation_and_spells_numbers_consistently():
    english = normalizer_for("en")
    assert error_rates(["Hello, World!"], ["hello world"], english).wer == 0.0
    assert error_rates(["It costs twenty five dollars."], ["it costs $25"], english).wer == 0.0
    assert error_rates(["Hello, World!"], ["hello world"]).wer == 1.0  # unnormalised: both words differ
    basic = normalizer_for("fr")
    assert error_rates(["Ça va, bien?"], ["ça va bien"], basic).wer == 0.0


def test_error_rates_needs_one_hypothesis_per_reference():
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        error_rates(["a", "b"], ["a"])
