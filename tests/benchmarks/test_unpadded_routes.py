"""benchmarks/unpadded_routes.py: the report of stored route results (training is exercised by tests/training)."""

import json

import pytest

from benchmarks import unpadded_routes


def _result(route: str, seed: int, wer: float, capped: int = 0) -> dict:
    split = {"wer": wer, "capped": capped, "clips": 240, "wer_without_capped": wer / 2 if capped else wer, "rtf": 0.1}
    return {
        "route": route,
        "seed": seed,
        "settings": {},
        "variant": "rotary/learned" if "transplant" in route else "sinusoidal/learned",
        "run_seconds": 1.0,
        "seconds_per_step": 2.5 if route != "source-padded" else None,
        "evaluation": {"in-domain": split, "retained": split},
    }


def test_report_only_tabulates_every_stored_run_in_route_order(tmp_path):
    for route, seed, wer, capped in [
        ("transplant", 1, 0.30, 2),
        ("source-padded", 0, 0.188, 0),
        ("transplant", 0, 0.27, 0),
    ]:
        (tmp_path / f"{route}-seed{seed}").mkdir()
        (tmp_path / f"{route}-seed{seed}" / "result.json").write_text(json.dumps(_result(route, seed, wer, capped)))
    assert unpadded_routes.main(["--corpus", str(tmp_path), "--out", str(tmp_path), "--report-only"]) == 0
    rows = (tmp_path / "routes.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| source-padded", "0"],
        ["| transplant", "0"],
        ["| transplant", "1"],
    ]
    assert "30.0 (2; 15.0)" in rows[2] and rows[2].endswith("| – | 2.50 |")  # no festival split: a dash
    assert (tmp_path / "routes.png").stat().st_size > 10_000


def test_report_only_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(SystemExit, match="no \\*/result.json"):
        unpadded_routes.main(["--corpus", str(tmp_path), "--out", str(tmp_path), "--report-only"])
