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


def test_index_case_scores_top_100_lists_and_flat_loses_nothing(tmp_path, capsys):
    import numpy as np
    import pytest

    pytest.importorskip("faiss")
    bench = load_script("bench_search")
    # the scores of hand-made lists: query 0 finds its 2 matches at positions 1 and 3 of 3 true matches
    p = {"g_pids": np.array([5, 7, 5, 5, 7]), "g_cams": np.array([1, 1, 2, 3, 1]), "q_pids": np.array([5, 7]),
         "q_cams": np.array([0, 1])}
    rows = np.array([[1, 0, 4, 2], [0, 4, -1, -1]])  # query 1 (pid 7, camera 1): both of its items are same-camera
    got = bench.top100_scores(rows, p)
    assert got == {"rank1": 0.0, "rank10": 1.0, "mAP@100": pytest.approx((1 / 2 + 2 / 4) / 3)}
    out = tmp_path / "rows.json"
    assert bench.main(["--cases", "index", "--dims", "64", "--distractors", "1000", "--num-query", "60",
                       "--num-gallery", "3000", "--threads", "1", "--index-types", "ivf", "--json", str(out)]) == 0
    got = {r["type"]: r for r in json.loads(out.read_text())}
    assert got["flat"]["mAP@100 lost"] == 0 and got["ivf"]["index"].startswith("IVF")
    assert 0 < got["flat"]["mAP@100"] <= 1 and got["ivf"]["search"]["nprobe"] >= 1
    assert "| 64 | 4,000 | IVF" in capsys.readouterr().out
