"""Re-ID evaluation without the query x gallery matrix: the streaming evaluator against the dense one (equal
ranks, equal numbers), the canonical distance tiles, the chunked search, the same-person ROC against a slow
reference, the k-reciprocal re-ranking on the sparse neighbour graph against the dense one, memory bounds."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from dcal.metrics import compute_distance, eval_reid_features, evaluate_reid, nearest_gallery, re_ranking
from dcal.metrics import distance as distance_mod
from dcal.metrics import reid as reid_mod
from dcal.metrics.distance import TILE_COLS, TILE_ROWS, FeatureDistances
from dcal.metrics.reid import distance_source
from tests.metrics.test_reid_metrics import reference


def _quantised(seed: int, nq: int, ng: int, dim: int = 6, levels: int = 2, n_ids: int = 30, n_cams: int = 4):
    """Features on a small integer grid (many exact ties: equal vectors, equal distances), junk (-1) in the
    gallery, same-camera matches, identities absent from the gallery (queries without a match)."""
    rng = np.random.default_rng(seed)
    qf = rng.integers(-levels, levels + 1, (nq, dim)).astype(np.float32)
    gf = rng.integers(-levels, levels + 1, (ng, dim)).astype(np.float32)
    gf[ng // 2 : ng // 2 + 20] = gf[0]  # exact duplicates
    qp = rng.integers(0, n_ids + 5, nq)  # ids >= n_ids never occur in the gallery
    gp = rng.integers(-1, n_ids, ng)
    return (torch.from_numpy(qf), torch.from_numpy(gf), qp, gp, rng.integers(0, n_cams, nq),
            rng.integers(0, n_cams, ng))


@pytest.mark.parametrize(("nq", "ng", "chunk"), [(40, 90, None), (300, 9000, 1), (300, 9000, 10**9)])
@pytest.mark.parametrize(("metric", "normalize"), [("euclidean", True), ("cosine", True), ("sqeuclidean", False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_streaming_equals_dense_evaluator(nq: int, ng: int, chunk: int | None, metric: str, normalize: bool,
                                          threads: int) -> None:
    qf, gf, qp, gp, qc, gc = _quantised(nq + ng, nq, ng)
    d = compute_distance(qf, gf, metric, normalize)
    assert len(np.unique(d)) < d.size / 3  # ties everywhere
    dense = evaluate_reid(d, qp, gp, qc, gc, max_rank=50, return_ranks=True)
    res = eval_reid_features(qf, gf, qp, gp, qc, gc, metric=metric, normalize=normalize, chunk_size=chunk,
                             return_ranks=True, num_threads=threads)
    assert 0 < dense["num_skipped_queries"] < nq  # queries without a match are in the set
    np.testing.assert_array_equal(res["match_ranks"], dense["match_ranks"])
    np.testing.assert_array_equal(res["num_matches"], dense["num_matches"])
    np.testing.assert_array_equal(res["cmc"], dense["cmc"][: len(res["cmc"])])
    for k in ("mAP", "mINP"):
        assert abs(res[k] - dense[k]) <= 1e-12, k
    for k in ("num_valid_queries", "num_skipped_queries"):
        assert res[k] == dense[k]
    if nq <= 40:  # and both against the per-query loop
        ref = reference(d, qp, gp, qc, gc)
        assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
        assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)


def test_streaming_with_float16_features_and_no_valid_query() -> None:
    qf, gf, qp, gp, qc, gc = _quantised(1, 50, 300)
    half = eval_reid_features(qf.half(), gf.half(), qp, gp, qc, gc, return_ranks=True)
    full = evaluate_reid(compute_distance(qf.half(), gf.half()), qp, gp, qc, gc, return_ranks=True)
    np.testing.assert_array_equal(half["match_ranks"], full["match_ranks"])
    with pytest.raises(reid_mod.NoValidQueryError):
        eval_reid_features(qf, gf, qp + 1000, gp, qc, gc)
    bad = qf.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"query features hold NaN or inf \(row 3\)"):
        eval_reid_features(bad, gf, qp, gp, qc, gc)


def test_distances_come_from_canonical_tiles() -> None:
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(600, 24, generator=g), torch.randn(9000, 24, generator=g)
    full = compute_distance(q, x)
    src = FeatureDistances(q, x)
    for rows, cols in (((0, 600), (4096, 9000)), ((256, 512), (0, 4096)), ((512, 600), (8192, 9000))):
        np.testing.assert_array_equal(src.block(rows, cols), full[rows[0] : rows[1], cols[0] : cols[1]])
    with pytest.raises(ValueError, match="tiles"):
        src.block((1, 10), (0, 100))
    assert (TILE_ROWS, TILE_COLS) == (256, 4096)


def test_nearest_gallery_equals_a_stable_sort_with_the_exclusions() -> None:
    qf, gf, qp, gp, qc, gc = _quantised(2, 300, 5000)
    d = compute_distance(qf, gf)
    d[((gp[None] == qp[:, None]) & (gc[None] == qc[:, None])) | (gp[None] == -1)] = np.inf
    expected = np.argsort(d, axis=1, kind="stable")[:, :25]
    for chunk in (1, None):
        order, dist = nearest_gallery(distance_source(qf, gf), 25, (qp, gp, qc, gc), chunk)
        np.testing.assert_array_equal(order, expected)
        np.testing.assert_array_equal(dist, np.take_along_axis(d, expected, 1))
    # without ids: nothing excluded; a gallery shorter than k gives k = the gallery
    order, dist = nearest_gallery(distance_source(qf[:3], gf[:7]), 50)
    np.testing.assert_array_equal(order, np.argsort(compute_distance(qf[:3], gf[:7]), 1, kind="stable"))


@pytest.mark.parametrize("threads", [1, 2])
def test_roc_equals_a_slow_reference(threads: int) -> None:
    qf, gf, qp, gp, qc, gc = _quantised(3, 300, 5000, dim=12, levels=3)
    res = eval_reid_features(qf, gf, qp, gp, qc, gc, roc=True, chunk_size=1, num_threads=threads)["roc"]
    d = compute_distance(qf, gf)
    same = gp[None] == qp[:, None]
    keep = (gp[None] != -1) & ~(same & (gc[None] == qc[:, None]))
    pos, neg = d[keep & same], d[keep & ~same]
    assert (res["num_positive_pairs"], res["num_negative_pairs"]) == (len(pos), len(neg))
    neg_sorted = np.sort(neg)
    for f, tag in ((1e-2, "1e-2"), (1e-3, "1e-3"), (1e-4, "1e-4")):
        v = neg_sorted[int(np.floor(f * len(neg)))]  # the first negative that may not pass
        thr = res[f"threshold_at_fpr_{tag}"]
        assert np.float32(thr) == np.nextafter(v, np.float32(-np.inf))
        assert res[f"tpr_at_fpr_{tag}"] == np.mean(pos <= np.float32(thr)) == np.mean(pos < v)
        assert res[f"fpr_at_fpr_{tag}"] == np.mean(neg <= np.float32(thr)) <= f
        # the threshold is the largest one within the FPR: the next float up lets one negative too many through
        assert np.mean(neg <= v) > f
    # the curve's points are exact at their thresholds
    fpr, tpr = res["curve_fpr"], res["curve_tpr"]
    assert np.all(np.diff(fpr) > 0) and np.all(np.diff(tpr) >= 0) and fpr[-1] == 1.0 and tpr[-1] == 1.0


def test_rerank_graph_equals_dense_rerank() -> None:
    rng = np.random.default_rng(4)
    nq, ng, n_ids, dim = 200, 1500, 120, 32
    centres = rng.normal(size=(n_ids, dim))
    qp, gp = rng.integers(0, n_ids, nq), rng.integers(-1, n_ids, ng)
    qf = torch.tensor(np.round(centres[qp] + 0.8 * rng.normal(size=(nq, dim)), 1), dtype=torch.float32)
    gf = torch.tensor(np.round(centres[np.maximum(gp, 0)] + 0.8 * rng.normal(size=(ng, dim)), 1),
                      dtype=torch.float32)
    gf[100:110] = gf[0]  # ties in the neighbour lists
    qc, gc = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    for kwargs in ({}, {"k1": 7, "k2": 1, "lambda_value": 0.5}):
        dense = re_ranking(compute_distance(qf, gf), compute_distance(qf, qf), compute_distance(gf, gf), **kwargs)
        graph = distance_source(qf, gf, rerank=True, rerank_kwargs=kwargs, chunk_size=1)
        np.testing.assert_array_equal(graph.block((0, nq), (0, ng)), dense)  # to the bit
        assert graph.jaccard.nnz < nq * ng / 2  # d_J computed for the pairs that share an image only
        ref = evaluate_reid(dense, qp, gp, qc, gc, return_ranks=True)
        res = eval_reid_features(qf, gf, qp, gp, qc, gc, rerank=True, rerank_kwargs=kwargs, return_ranks=True)
        np.testing.assert_array_equal(res["match_ranks"], ref["match_ranks"])
        assert res["mAP"] == ref["mAP"] and res["reranked"]
    plain = eval_reid_features(qf, gf, qp, gp, qc, gc)
    assert res["mAP"] != plain["mAP"]


def test_rerank_graph_across_gallery_tiles_equals_dense() -> None:
    rng = np.random.default_rng(5)
    qf = torch.tensor(rng.integers(-2, 3, (40, 5)), dtype=torch.float32)
    gf = torch.tensor(rng.integers(-2, 3, (4500, 5)), dtype=torch.float32)  # two gallery tiles, many ties
    dense = re_ranking(compute_distance(qf, gf), compute_distance(qf, qf), compute_distance(gf, gf), k1=6, k2=3)
    graph = distance_source(qf, gf, rerank=True, rerank_kwargs={"k1": 6, "k2": 3}, chunk_size=1)
    np.testing.assert_array_equal(graph.block((0, 40), (0, 4500)), dense)


def test_dense_rerank_that_would_not_fit_is_refused(monkeypatch) -> None:
    qf, gf, qp, gp, qc, gc = _quantised(6, 20, 60)
    monkeypatch.setattr(reid_mod, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"^dense re-ranking of 20 queries x 60 gallery items needs about .* GiB, "
                                          r".*eval\.rerank_method=graph"):
        eval_reid_features(qf, gf, qp, gp, qc, gc, rerank=True, rerank_method="dense")
    with pytest.raises(ValueError, match="re-ranking method"):
        eval_reid_features(qf, gf, qp, gp, qc, gc, rerank=True, rerank_method="sparse")


def test_default_chunk_follows_free_memory(monkeypatch) -> None:
    monkeypatch.setattr(distance_mod, "available_memory", lambda: 8 << 30)
    assert distance_mod.default_chunk_size() == (1 << 30) // distance_mod.BYTES_PER_DISTANCE  # capped at 1 GiB
    monkeypatch.setattr(distance_mod, "available_memory", lambda: 400 << 20)
    size = distance_mod.default_chunk_size()
    assert size * distance_mod.BYTES_PER_DISTANCE <= 100 << 20
    rows, cols = distance_mod._block_shape(3368, 515913, size)
    assert rows % TILE_ROWS == 0 and cols % TILE_COLS == 0 and rows * cols <= size
    assert distance_mod._block_shape(3368, 515913, 1) == (TILE_ROWS, TILE_COLS)  # at least one tile


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_chunk_not_the_gallery() -> None:
    chunk = TILE_ROWS * TILE_COLS
    peaks = []
    for ng in (8192, 32768):  # identities grow with the gallery: each query keeps ~270 same-identity items
        qf, gf, qp, gp, qc, gc = _quantised(7, 256, ng, dim=4, n_ids=30 * ng // 8192)
        args = (qf.numpy(), gf.numpy(), qp, gp, qc, gc)
        peaks.append(_peak(lambda a=args: eval_reid_features(*a, chunk_size=chunk)))
    dense_matrix = 256 * 32768 * 4
    assert peaks[1] < 1.2 * peaks[0] + (1 << 20)  # 4x the gallery, about the same memory
    assert peaks[1] < distance_mod.BYTES_PER_DISTANCE * chunk + 2 * dense_matrix // 4
