"""benchmarks/wrong_word_recovery.py: the forced first word, and what each model writes after it."""

import json

from whisper.normalizers import EnglishTextNormalizer

from benchmarks import wrong_word_recovery
from tests.conftest import FIXTURES

SPEECH = FIXTURES / "speech"


def test_every_model_decodes_after_the_sources_second_word_and_the_table_counts_it(tmp_path, capsys):
    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines()][:3]
    manifest = tmp_path / "set.jsonl"  # one path absolute, the others relative to the manifest's folder
    rows[0]["audio"] = str(SPEECH / rows[0]["audio"])
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in rows[1:]:
        (tmp_path / row["audio"]).symlink_to(SPEECH / row["audio"])
    out = tmp_path / "rows.jsonl"
    argv = ["--data", str(manifest), "--models", "source=tiny.en", "again=tiny.en", "--rows", str(out)]
    assert wrong_word_recovery.main([*argv, "--no-progress"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 3 * 2 * 2  # windows x models x (free, forced)
    normalise = EnglishTextNormalizer()
    free = {r["window"]: r for r in scored if r["model"] == "source" and not r["forced"]}
    assert sum(r["errors"] for r in free.values()) <= 2  # tiny.en reads the clean fixtures
    for row in scored:
        if row["forced"]:
            first, own = normalise(row["text"]).split()[0], normalise(free[row["window"]]["text"]).split()[0]
            assert first != own and row["errors"] >= 1  # another word leads, and it is a wrong one
        assert not row["repeats"]
    again = [{**r, "model": "source"} for r in scored if r["model"] == "again"]
    assert again == [r for r in scored if r["model"] == "source"]  # the same model writes the same
    report = capsys.readouterr().out
    assert report.count("| 3 |") == 2 and "| source | 3 |" in report


def test_the_table_sums_errors_words_and_repeating_hypotheses_per_model_and_way():
    rows = [
        {"model": "a", "window": "w1", "forced": False, "errors": 1, "words": 10, "repeats": False},
        {"model": "a", "window": "w1", "forced": True, "errors": 30, "words": 10, "repeats": True},
        {"model": "a", "window": "w2", "forced": False, "errors": 0, "words": 10, "repeats": False},
        {"model": "a", "window": "w2", "forced": True, "errors": 2, "words": 10, "repeats": False},
    ]
    lines = wrong_word_recovery.table(rows).splitlines()
    assert lines[-1] == "| a | 2 | 1 (5.0) | 0 | 32 (160.0) | 1 |"
