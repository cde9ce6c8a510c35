"""benchmarks/length_bucket_report.py: one row per set, the models side by side, the 10 %-or-1-point verdict."""

import json

from benchmarks import length_bucket_report


def _summary(folder, tag, stem, wer, capped=0, seconds=30.0, clips=3):
    row = {"wer": wer, "n_capped": capped, "audio_seconds": seconds, "n_utterances": clips}
    (folder / f"{tag}-{stem}.json").write_text(json.dumps(row))


def test_the_table_puts_models_side_by_side_and_judges_each_set_against_the_first(tmp_path):
    _summary(tmp_path, "src", "retained-0-5s", 0.10)
    _summary(tmp_path, "new", "retained-0-5s", 0.109)  # within 10 % relative
    _summary(tmp_path, "src", "retained-20-30s", 0.04)
    _summary(tmp_path, "new", "retained-20-30s", 0.051, capped=2)  # 1.1 points worse: outside
    _summary(tmp_path, "src", "batched-retained-long", 0.05)  # no adapted result: no verdict
    lines = length_bucket_report.table(tmp_path, {"source": "src", "adapted": "new"}).splitlines()
    assert lines[0] == "| set | source WER % (capped) | adapted WER % (capped) | within target |"
    assert "| retained 0-5s | 10.0 (0) | 10.9 (0) | yes |" in lines
    assert "| retained 20-30s | 4.0 (0) | 5.1 (2) | no |" in lines
    assert "| retained long, batched | 5.0 (0) | – |  |" in lines
    assert len(lines) == 5  # sets with no result at all are left out


def test_the_target_is_ten_percent_relative_or_one_point():
    assert length_bucket_report.within_target(0.055, 0.05)  # 1 point is the larger allowance
    assert not length_bucket_report.within_target(0.0601, 0.05)
    assert length_bucket_report.within_target(0.33, 0.30) and not length_bucket_report.within_target(0.331, 0.30)


def test_the_plot_draws_every_split_that_has_results(tmp_path):
    for tag, wer in (("src", 0.1), ("new", 0.2)):
        for bucket in length_bucket_report.BUCKETS:
            _summary(tmp_path, tag, f"in-domain-{bucket}", wer)
    length_bucket_report.plot(tmp_path, {"source": "src", "adapted": "new"}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
