"""benchmarks/bench_search.py at tiny sizes (no timing here: the benchmark itself measures)."""

from __future__ import annotations

import json

from tests.helpers import load_script


def test_eval_case_runs_and_both_evaluators_agree(tmp_path, capsys):
    bench = load_script("bench_search")
    out = tmp_path / "rows.json"
    assert bench.main(["--cases", "eval", "--dims", "16", "--distractors", "0", "300", "--num-query", "60",
                       "--num-gallery", "400", "--chunk-size", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["evaluator"], r["gallery"]) for r in rows] == [("dense", 400), ("streaming", 400), ("dense", 700),
                                                              ("streaming", 700)]
    assert all(r["equal"] and r["seconds"] > 0 and r["peak_beyond_features_gb"] >= 0 for r in rows)
    assert rows[0]["mAP"] == rows[1]["mAP"] and 0 < rows[0]["mAP"] < 1
    assert "| eval | 16 | 700 | streaming |" in capsys.readouterr().out
