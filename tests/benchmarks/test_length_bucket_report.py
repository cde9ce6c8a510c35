"""benchmarks/length_bucket_report.py: one row per set, the models side by side, the 10 %-or-1-point verdict, draws
pooled unit by unit, and the paired bootstrap interval of each difference."""

import json
import sys

import numpy as np
import pytest
import torch

import whisper_rope
from benchmarks import length_bucket_report
from tests.conftest import FIXTURES, randomise_, small_dims
from whisper_rope.evaluation.evaluate import evaluate

MODELS = {"source": "src", "adapted": "new"}


def _rows(folder, tag, stem, errors, words=10, capped=(), seconds=4.0):
    """evaluate's two files for ``tag`` on ``stem``: one unit per entry of ``errors`` (all substitutions)."""
    rows = [
        {
            "audio": f"{stem}/{number:04d}.flac",
            "substitutions": count,
            "deletions": 0,
            "insertions": 0,
            "n_words": words,
            "capped": number in capped,
            "seconds": seconds,
        }
        for number, count in enumerate(errors)
    ]
    folder.mkdir(exist_ok=True)
    (folder / f"{tag}-{stem}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{tag}-{stem}.json").write_text(json.dumps({"wer": sum(errors) / (words * len(errors))}))


def test_the_table_puts_models_side_by_side_and_judges_each_set_against_the_first(tmp_path):
    _rows(tmp_path, "src", "retained-0-5s", [1, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # 10.0 %
    _rows(tmp_path, "new", "retained-0-5s", [1, 1, 1, 1, 1, 1, 1, 1, 1, 2])  # 11.0 %: within 10 % relative
    _rows(tmp_path, "src", "retained-20-30s", [0, 0, 1, 1, 0], words=20)  # 2.0 %
    _rows(tmp_path, "new", "retained-20-30s", [1, 0, 1, 1, 0], words=20, capped=(0, 4))  # 3.0 %: 1 point is within
    _rows(tmp_path, "src", "retained-10-20s", [0, 0, 1, 1, 0], words=20)  # 2.0 %
    _rows(tmp_path, "new", "retained-10-20s", [1, 0, 1, 1, 1], words=20)  # 4.0 %: outside
    _rows(tmp_path, "src", "batched-retained-long", [4, 6], words=100)  # no adapted result: no verdict
    lines = length_bucket_report.table([tmp_path], MODELS).splitlines()
    assert lines[0] == "| set | units | words | source WER % (capped) | adapted WER % (capped) | within target |"
    assert "| retained 0-5s | 10 | 100 | 10.0 (0) | 11.0 (0) | yes |" in lines
    assert "| retained 10-20s | 5 | 100 | 2.0 (0) | 4.0 (0) | no |" in lines
    assert "| retained 20-30s | 5 | 100 | 2.0 (0) | 3.0 (2) | yes |" in lines
    assert "| retained long, batched | 2 | 200 | 5.0 (0) | – |  |" in lines
    assert len(lines) == 6  # sets with no result at all are left out


def test_the_target_is_ten_percent_relative_or_one_point():
    assert length_bucket_report.within_target(0.055, 0.05)  # 1 point is the larger allowance
    assert not length_bucket_report.within_target(0.0601, 0.05)
    assert length_bucket_report.within_target(0.33, 0.30) and not length_bucket_report.within_target(0.331, 0.30)


def test_draws_pool_unit_by_unit_over_the_folders_the_first_model_was_evaluated_on(tmp_path):
    first, second, third = tmp_path / "draw0", tmp_path / "draw1", tmp_path / "draw2"
    _rows(first, "src", "in-domain-long", [5, 7], words=100)
    _rows(first, "new", "in-domain-long", [12, 7], words=100)  # 9.5 against 6.0 %: outside on this draw alone
    _rows(second, "src", "in-domain-long", [6, 6, 6], words=100)
    _rows(second, "new", "in-domain-long", [6, 5, 6], words=100)
    _rows(third, "new", "in-domain-long", [50], words=100)  # no source here: not part of the comparison
    alone = length_bucket_report.table([first], MODELS)
    assert "| in-domain long, loop | 2 | 200 | 6.0 (0) | 9.5 (0) | no |" in alone
    both = length_bucket_report.table([first, second, third], MODELS)
    assert "| in-domain long, loop | 5 | 500 | 6.0 (0) | 7.2 (0) | no |" in both  # 36 / 500 words
    source, adapted = length_bucket_report.scores_of([first, second, third], MODELS, "in-domain-long")
    assert source.units == adapted.units and len(source.units) == 5
    assert adapted.errors.tolist() == [12, 7, 6, 5, 6] and adapted.wer == pytest.approx(0.072)


def test_a_model_missing_from_one_draw_gets_no_pooled_figure(tmp_path):
    first, second = tmp_path / "draw0", tmp_path / "draw1"
    for folder in (first, second):
        _rows(folder, "src", "retained-0-5s", [1, 2])
    _rows(first, "new", "retained-0-5s", [1, 2])
    assert "| retained 0-5s | 4 | 40 | 15.0 (0) | – |  |" in length_bucket_report.table([first, second], MODELS)


def test_the_bootstrap_interval_is_the_spread_of_paired_resamples(tmp_path):
    # Two units of 10 words; the adapted model makes 2 more errors on the second: resamples of (first, first),
    # (first, second) and (second, second) differ by 0, 10 and 20 points, with chances 1/4, 1/2 and 1/4.
    _rows(tmp_path, "src", "retained-5-10s", [0, 0])
    _rows(tmp_path, "new", "retained-5-10s", [0, 2])
    report = length_bucket_report.table([tmp_path], MODELS, bootstrap=4000)
    assert report.splitlines()[0].endswith("| adapted − source, points (95 % interval) |")
    assert "| retained 5-10s | 2 | 20 | 0.0 (0) | 10.0 (0) | no | +10.0 [+0.0, +20.0] |" in report
    # One more error on every unit of ten words is 10 points in every resample, however the units are drawn.
    _rows(tmp_path, "src", "retained-10-20s", [3, 0, 5, 1, 2, 0, 4])
    _rows(tmp_path, "new", "retained-10-20s", [4, 1, 6, 2, 3, 1, 5])
    source, adapted = length_bucket_report.scores_of([tmp_path], MODELS, "retained-10-20s")
    assert length_bucket_report.difference_interval(source, adapted, 500) == pytest.approx((0.1, 0.1))
    assert length_bucket_report._points(-0.0004) == "+0.0" and length_bucket_report._points(-0.0006) == "-0.1"
    # The interval of a real spread covers its point and narrows as the set grows (same per-unit errors, 16x the units).
    rng = np.random.default_rng(1)
    errors = rng.integers(0, 4, 40)
    _rows(tmp_path, "src", "retained-20-30s", errors.tolist())
    _rows(tmp_path, "new", "retained-20-30s", (errors + rng.integers(0, 2, 40)).tolist())
    _rows(tmp_path, "src", "in-domain-20-30s", np.tile(errors, 16).tolist())
    _rows(tmp_path, "new", "in-domain-20-30s", np.tile(errors + rng.integers(0, 2, 40), 16).tolist())
    widths = []
    for stem in ("retained-20-30s", "in-domain-20-30s"):
        source, adapted = length_bucket_report.scores_of([tmp_path], MODELS, stem)
        low, high = length_bucket_report.difference_interval(source, adapted, 2000)
        assert low < adapted.wer - source.wer < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_models_scored_on_other_units_are_refused_by_name(tmp_path):
    _rows(tmp_path, "src", "retained-0-5s", [1, 2])
    _rows(tmp_path, "new", "retained-0-5s", [1, 2, 0])
    with pytest.raises(ValueError, match="new-retained-0-5s: its rows are other audio"):
        length_bucket_report.table([tmp_path], MODELS)
    _rows(tmp_path, "new", "retained-0-5s", [1, 2], words=11)
    with pytest.raises(ValueError, match="new-retained-0-5s: its references differ"):
        length_bucket_report.table([tmp_path], MODELS)


def test_a_summary_without_its_rows_is_named(tmp_path, monkeypatch, capsys):
    _rows(tmp_path, "src", "retained-0-5s", [1, 2])
    (tmp_path / "src-retained-0-5s.jsonl").unlink()
    monkeypatch.setattr(sys, "argv", ["report", "--results", str(tmp_path), "--models", "source=src"])
    with pytest.raises(SystemExit):
        length_bucket_report.main()
    assert "src-retained-0-5s.jsonl: missing; the report reads the per-utterance rows" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["report", "--results", str(tmp_path), "--models", "source"])
    with pytest.raises(SystemExit):
        length_bucket_report.main()
    assert "--models takes NAME=TAG pairs, got 'source'" in capsys.readouterr().err


def test_the_report_scores_evaluates_own_files_as_evaluate_does(tmp_path):
    torch.manual_seed(0)
    model = randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper")).eval()
    result = evaluate(model, FIXTURES / "speech" / "manifest.jsonl", cap_factor=1.0, cap_offset=2, progress=False)
    result.write(tmp_path / "src-retained-0-5s.json")
    [scores] = length_bucket_report.scores_of([tmp_path], {"source": "src"}, "retained-0-5s")
    assert result.wer > 0.5 and scores.wer == pytest.approx(result.wer)
    assert scores.capped == result.n_capped and len(scores.units) == result.n_utterances == 8
    assert scores.seconds == pytest.approx(result.audio_seconds)


def test_the_plot_draws_every_split_that_has_results(tmp_path):
    for tag, errors in (("src", [1, 1]), ("new", [2, 2])):
        for bucket in length_bucket_report.BUCKETS:
            _rows(tmp_path, tag, f"in-domain-{bucket}", errors)
    length_bucket_report.plot([tmp_path], MODELS, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
