"""dcal embed / dcal search: features + index, ranking with the protocol's exclusions, metrics equal to dcal eval,
visrank pictures framed by true/false match, feature files reused across searches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcal.cli import main
from dcal.engine import build_datasets, eval_loader, extract_features
from dcal.loading import load_model
from dcal.retrieval import GREEN, RED, FeatureSet, parse_identity, ranking_picture
from tests.helpers import SHARED_DATA, needs_shared, write_images


def test_parse_identity_conventions():
    assert parse_identity("a/0002_c003_00084310_0.jpg") == (2, 2)  # VeRi: 3-digit camera
    assert parse_identity("a/0002_c1s1_000451_03.jpg") == (2, 0)  # Market / Duke
    assert parse_identity("a/-1_c4s2_000001_00.jpg") == (-1, 3)  # junk keeps its pid
    assert parse_identity("root/0007/0007_c2_0001.jpg") == (7, 1)  # reid_folder: pid from the folder
    assert parse_identity("photos/holiday.jpg") is None


@pytest.fixture(scope="module")
def embedded(reid_run, tmp_path_factory):
    run, root = reid_run
    out = tmp_path_factory.mktemp("feats")
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        assert main(["embed", "--run", str(run), str(root / folder), "--output", str(out / f"{split}.safetensors"),
                     "--batch-size", "3"]) == 0
    return run, root, out


def test_embed_writes_the_run_features_and_an_index(embedded):
    run, root, out = embedded
    q = FeatureSet.load(out / "query.safetensors")
    g = FeatureSet.load(out / "gallery.safetensors")
    assert q.pids == [20, 21, 22, 23] and q.camids == [0, 0, 0, 0]
    assert len(g) == 11 and -1 in g.pids and g.pids.count(20) == 3
    # the same features as dcal eval computes for the query split
    loaded = load_model(run=run, device="cpu")
    cfg = loaded.cfg
    cfg.data.root = str(root)
    query_set = build_datasets(cfg, train=False)["query"]
    want = extract_features(loaded.model, eval_loader(cfg, query_set), torch.device("cpu"), cfg)
    assert [str(p) for p in query_set.paths] == q.paths
    torch.testing.assert_close(q.features, want, atol=1e-5, rtol=1e-5)


def test_search_ranks_evaluates_and_draws(embedded, tmp_path, capsys):
    run, root, _ = embedded
    out = tmp_path / "search"
    assert main(["search", "--run", str(run), "--query", str(root / "query"), "--gallery",
                 str(root / "bounding_box_test"), "--output-dir", str(out), "--save-gallery",
                 str(tmp_path / "g.safetensors")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # dcal eval on the same data writes the same numbers under the same keys, in the same unit (%)
    assert main(["eval", "--run", str(run), f"data.root={root}", "--json", str(tmp_path / "eval.json")]) == 0
    reference = json.loads((tmp_path / "eval.json").read_text())
    scores = {"mAP", "rank1", "rank5", "rank10", "mINP", "num_skipped_queries"}
    assert set(metrics) == scores | {"cmc"} and scores <= set(reference)  # eval adds the mechanism's numbers
    for k in scores:
        assert metrics[k] == pytest.approx(reference[k], abs=1e-4), k
    assert 0.0 < metrics["mAP"] <= 100.0 and metrics["num_skipped_queries"] == 0
    # dcal eval also answers "same person or not": TPR at three FPRs, their thresholds, the ROC picture
    for tag in ("1e-2", "1e-3", "1e-4"):
        assert 0.0 <= reference[f"tpr_at_fpr_{tag}"] <= 100.0 and reference[f"threshold_at_fpr_{tag}"] >= 0.0
    with Image.open(run / "roc.png") as im:
        assert im.size[0] > 300
    # a roc.png that dcal did not write is never replaced by the default; with --checkpoint there is no default
    (run / "roc.png").write_bytes(b"mine")
    assert main(["eval", "--run", str(run), f"data.root={root}"]) == 0
    assert (run / "roc.png").read_bytes() == b"mine"
    (run / "roc.png").unlink()
    assert len(metrics["cmc"]) == 10 and metrics["cmc"][0] == metrics["rank1"] and metrics["cmc"][-1] == 100.0

    rows = list(csv.DictReader((out / "ranking.csv").open()))
    by_query: dict[str, list[dict]] = {}
    for r in rows:
        by_query.setdefault(r["query"], []).append(r)
    assert len(by_query) == 4
    for ranked in by_query.values():
        assert [int(r["rank"]) for r in ranked] == list(range(1, len(ranked) + 1))
        dists = [float(r["distance"]) for r in ranked]
        assert dists == sorted(dists)
        assert all(r["gallery_pid"] != "-1" for r in ranked)  # junk never ranked
        assert not any(r["gallery_pid"] == r["query_pid"] and r["gallery_camid"] == r["query_camid"] for r in ranked)
        assert all(r["match"] == str(int(r["gallery_pid"] == r["query_pid"])) for r in ranked)
        assert len(ranked) == 11 - 1 - (1 if ranked[0]["query_pid"] == "20" else 0)  # junk, same camera removed
        # rank-1 of the metrics = fraction of queries whose first row matches
    assert metrics["rank1"] == pytest.approx(100 * np.mean([v[0]["match"] == "1" for v in by_query.values()]))

    pics = sorted((out / "visrank").glob("*.png"))
    assert len(pics) == 4
    first_q = next(iter(by_query))
    with Image.open(pics[0]) as im:
        w, h = im.size
        cell_w = 64 + 8  # 128-pixel-high cells at the model's 1:2 input aspect, 4-pixel frames
        n = len(by_query[first_q])
        assert (w, h) == (cell_w * (n + 1) + 6 * (n - 1) + 30, 128 + 8 + 14)
        frame = im.getpixel((cell_w + 30 + 1, h // 2))  # left frame of the rank-1 gallery image
        assert frame == (GREEN if by_query[first_q][0]["match"] == "1" else RED)

    # reuse: the saved gallery features and a features file for the queries give the same ranking without a model
    out2 = tmp_path / "search2"
    assert main(["search", "--query", str(embedded[2] / "query.safetensors"), "--gallery",
                 str(tmp_path / "g.safetensors"), "--output-dir", str(out2), "--num-vis", "0"]) == 0
    again = list(csv.DictReader((out2 / "ranking.csv").open()))  # query features of batch 3 here: float noise only
    key = [(r["query"], r["rank"], r["gallery"]) for r in rows]
    assert [(r["query"], r["rank"], r["gallery"]) for r in again] == key
    np.testing.assert_allclose([float(r["distance"]) for r in again], [float(r["distance"]) for r in rows], atol=1e-5)
    assert not (out2 / "visrank").exists()


def test_search_without_ids_ranks_only_and_mismatched_features_fail(embedded, tmp_path, capsys):
    run, root, feats = embedded
    rng = np.random.default_rng(3)
    write_images(tmp_path / "mine", ["a.jpg", "b.jpg"], rng, size=(64, 32))
    out = tmp_path / "s"
    assert main(["search", "--run", str(run), "--query", str(tmp_path / "mine"), "--gallery",
                 str(feats / "gallery.safetensors"), "--output-dir", str(out), "--max-rank", "3"]) == 0
    assert "no evaluation" in capsys.readouterr().out and not (out / "metrics.json").exists()
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert len(rows) == 2 * 3 and {r["match"] for r in rows} == {""}
    # features from different settings are refused with the reason
    assert main(["embed", "--run", str(run), str(root / "query"), "--output", str(tmp_path / "flip.safetensors"),
                 "--flip"]) == 0
    assert main(["search", "--query", str(tmp_path / "flip.safetensors"), "--gallery",
                 str(feats / "gallery.safetensors"), "--output-dir", str(tmp_path / "x")]) == 2
    assert "flip" in capsys.readouterr().err


def test_ranking_picture_frames(tmp_path):
    paths = write_images(tmp_path, ["q.png", "g1.png", "g2.png", "g3.png"], np.random.default_rng(0))
    pic = ranking_picture(str(paths[0]), [str(p) for p in paths[1:]], [True, False, None], cell=(20, 40), border=2,
                          gap=5, query_gap=10)
    assert pic.size == (4 * 24 + 2 * 5 + 10, 44 + 14)
    xs = [24 + 10 + r * (24 + 5) for r in range(3)]
    assert [pic.getpixel((x, 30)) for x in xs] == [GREEN, RED, (160, 160, 160)]


@needs_shared
@pytest.mark.parametrize("split", ["query", "bounding_box_test"])
def test_identities_of_real_market_names_match_the_dataset_reader(split):
    from dcal.data import build_dataset
    from dcal.inference import list_images

    root = SHARED_DATA / "market1501_mini"
    data = build_dataset("market1501", str(root), "query" if split == "query" else "gallery")
    ids = {str(p): parse_identity(p) for p in list_images([root / split])}
    assert len(ids) >= len(data.paths)  # the reader drops junk (-1) images, which keep their pid here
    for path, pid, cam in zip(data.paths, data.pids, data.camids, strict=True):
        assert ids[str(path)] == (pid, cam), path


def test_search_threshold_and_rerank(embedded, tmp_path, capsys):
    _, _, feats = embedded
    q, g = str(feats / "query.safetensors"), str(feats / "gallery.safetensors")
    out = tmp_path / "plain"
    assert main(["search", "--query", q, "--gallery", g, "--output-dir", str(out), "--num-vis", "0"]) == 0
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert {r["in_gallery"] for r in rows} == {""}  # no threshold: no answer
    best = {r["query"]: float(r["distance"]) for r in rows if r["rank"] == "1"}
    ordered = sorted(best.values())
    assert ordered[1] < ordered[2]
    cut = (ordered[1] + ordered[2]) / 2  # the two nearest queries are in the gallery, the others not
    out_t = tmp_path / "threshold"
    assert main(["search", "--query", q, "--gallery", g, "--output-dir", str(out_t), "--num-vis", "0",
                 "--threshold", repr(cut), "--chunk-size", "1"]) == 0
    assert f"{len(best) - 2} of {len(best)} queries not in the gallery" in capsys.readouterr().out
    rows_t = list(csv.DictReader((out_t / "ranking.csv").open()))
    assert [(r["query"], r["gallery"]) for r in rows_t] == [(r["query"], r["gallery"]) for r in rows]
    assert all(r["in_gallery"] == str(int(best[r["query"]] <= cut)) for r in rows_t)
    # re-ranking: the neighbour graph and the dense matrices give the same ranking and numbers
    results = {}
    for method in ("graph", "dense"):
        o = tmp_path / method
        assert main(["search", "--query", q, "--gallery", g, "--output-dir", str(o), "--num-vis", "0",
                     "--rerank", method]) == 0
        results[method] = ((o / "ranking.csv").read_text(), json.loads((o / "metrics.json").read_text()))
    assert results["graph"] == results["dense"]
