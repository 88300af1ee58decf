"""Re-id metrics against a straightforward per-query reference; distances; re-ranking; real mini data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dcal.metrics import NoValidQueryError, compute_distance, eval_reid_features, evaluate_reid, re_ranking

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is absent (it is present in CI)")


def reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50, drop_junk=True):
    """Per-query loop in torchreid's style (``eval_market1501``), with a stable sort and, optionally, junk
    (pid -1) gallery items removed from every ranking."""
    distmat = np.asarray(distmat, dtype=np.float64)
    num_q, num_g = distmat.shape
    n_real = int((g_pids != -1).sum()) if drop_junk else num_g
    max_rank = min(max_rank, n_real)
    cmcs, aps, inps = [], [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        remove = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
        if drop_junk:
            remove |= g_pids[order] == -1
        raw = (g_pids[order][~remove] == q_pids[i]).astype(np.int64)
        if not raw.any():
            continue
        hits = np.flatnonzero(raw)
        cmc = np.zeros(max_rank, np.float32)
        cmc[min(hits[0], max_rank):] = 1
        cmcs.append(cmc)
        precision = raw.cumsum() / (np.arange(len(raw)) + 1.0)
        aps.append((precision * raw).sum() / raw.sum())
        inps.append(raw.sum() / (hits[-1] + 1.0))
    if not cmcs:
        return None
    return {"cmc": np.asarray(cmcs).sum(0) / len(cmcs), "mAP": float(np.mean(aps)),
            "mINP": float(np.mean(inps)), "num_valid_queries": len(cmcs), "num_skipped_queries": num_q - len(cmcs)}


def _assert_same(res, ref):
    assert res["num_valid_queries"] == ref["num_valid_queries"]
    assert res["num_skipped_queries"] == ref["num_skipped_queries"]
    assert len(res["cmc"]) == len(ref["cmc"])
    np.testing.assert_allclose(res["cmc"], ref["cmc"], rtol=0, atol=1e-9)
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-9)


def _problem(rng, nq, ng, n_ids=6, n_cams=3, junk=True, kind="int"):
    lo = -1 if junk else 0
    q_pids = rng.integers(0, n_ids, nq)
    g_pids = rng.integers(lo, n_ids, ng)
    q_cams, g_cams = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)
    if kind == "int":  # integer-valued: many ties
        d = rng.integers(0, 6, (nq, ng)).astype(np.float32)
    elif kind == "float64":  # values float32 cannot hold: the stable-argsort path
        d = rng.integers(0, 4, (nq, ng)) + rng.integers(0, 2, (nq, ng)) * 1e-12
    else:
        d = rng.random((nq, ng), dtype=np.float32) - 0.5  # negative values and -0.0 as well
        d[rng.random((nq, ng)) < 0.05] = -0.0
    return d, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("kind", ["int", "float32", "float64"])
def test_matches_reference_with_ties_junk_and_skips(kind: str, caplog) -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        nq, ng = int(rng.integers(1, 30)), int(rng.integers(1, 70))
        d, qp, gp, qc, gc = _problem(rng, nq, ng, kind=kind, junk=trial % 4 != 0)
        ref = reference(d, qp, gp, qc, gc)
        if ref is None:
            with pytest.raises(NoValidQueryError):
                evaluate_reid(d, qp, gp, qc, gc)
            continue
        caplog.clear()
        res = evaluate_reid(d, qp, gp, qc, gc, chunk_size=int(rng.integers(1, 8)), num_threads=int(rng.integers(1, 3)))
        # a gallery shorter than max_rank=50 says so (logged: a warning on the commands' stderr)
        assert any("max_rank lowered" in r.getMessage() for r in caplog.records) == (int((gp != -1).sum()) < 50)
        _assert_same(res, ref)
        assert res["cmc"].dtype == np.float32


def test_torch_inputs_chunking_and_max_rank() -> None:
    rng = np.random.default_rng(1)
    d, qp, gp, qc, gc = _problem(rng, 120, 400, n_ids=30, n_cams=6)
    ref = reference(d, qp, gp, qc, gc, max_rank=20)
    results = [evaluate_reid(torch.from_numpy(d), torch.from_numpy(qp), gp.tolist(), qc, gc, max_rank=20,
                             chunk_size=cs, num_threads=th) for cs, th in ((1, 1), (7, 2), (1000, 1))]
    for res in results:
        _assert_same(res, ref)
        np.testing.assert_array_equal(res["cmc"], results[0]["cmc"])
        assert res["mAP"] == results[0]["mAP"] and res["mINP"] == results[0]["mINP"]
    full = evaluate_reid(d, qp, gp, qc, gc, max_rank=400)
    assert full["mAP"] == results[0]["mAP"]  # max_rank truncates CMC only
    np.testing.assert_array_equal(full["cmc"][:20], results[0]["cmc"])
    assert full["cmc"][-1] == 1.0


def test_no_junk_equals_torchreid_and_junk_is_removed() -> None:
    rng = np.random.default_rng(2)
    d, qp, gp, qc, gc = _problem(rng, 40, 90, junk=False, kind="float32")
    _assert_same(evaluate_reid(d, qp, gp, qc, gc), reference(d, qp, gp, qc, gc, drop_junk=False))
    # One query, gallery: junk (closest), then the true match under another camera.
    d = np.array([[0.1, 0.2, 0.3]], np.float32)
    res = evaluate_reid(d, [5], [-1, 5, 7], [0], [1, 1, 1])
    assert res["mAP"] == 1.0 and res["cmc"][0] == 1.0 and len(res["cmc"]) == 2  # junk never counts
    torchreid_like = reference(d, np.array([5]), np.array([-1, 5, 7]), np.array([0]), np.array([1, 1, 1]),
                               drop_junk=False)
    assert torchreid_like["mAP"] == 0.5  # what an evaluator keeping junk as a non-match reports


def test_hand_computed_example() -> None:
    # gallery ranking for the query (pid 1, cam 0) by distance: g3(1,c0: removed) g0(2) g2(1) g4(1) g1(3)
    d = np.array([[0.2, 0.9, 0.3, 0.1, 0.3]], np.float32)
    g_pids, g_cams = [2, 3, 1, 1, 1], [1, 1, 1, 0, 2]
    res = evaluate_reid(d, [1], g_pids, [0], g_cams, max_rank=4)
    # filtered ranking: g0 (miss), g2 (hit @2), g4 (hit @3; tie with g2 broken by index), g1
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert res["mINP"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(res["cmc"], [0, 1, 1, 1])
    assert (res["num_valid_queries"], res["num_skipped_queries"]) == (1, 0)


def test_errors() -> None:
    with pytest.raises(NoValidQueryError):
        evaluate_reid(np.zeros((2, 3), np.float32), [1, 2], [3, 4, 5], [0, 0], [1, 1, 1])
    with pytest.raises(NoValidQueryError):  # same identity only under the same camera
        evaluate_reid(np.zeros((1, 2), np.float32), [1], [1, 1], [0], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_reid(np.array([[np.nan, 1.0]], np.float32), [1], [1, 2], [0], [1, 1])
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_reid(np.zeros((1, 2), np.float32), [1], [1, 2, 3], [0], [1, 1])


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("normalize", [True, False])
def test_compute_distance_brute_force(metric: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(13, 16, generator=g) * 3, torch.randn(29, 16, generator=g)
    q, x = qf.double(), gf.double()
    if normalize or metric == "cosine":
        q, x = q / q.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True)
    diff = q[:, None, :] - x[None, :, :]
    expected = {
        "euclidean": diff.norm(dim=2),
        "sqeuclidean": (diff**2).sum(2),
        "cosine": 1 - q @ x.T,
    }[metric].numpy()
    out = compute_distance(qf, gf.numpy(), metric=metric, normalize=normalize)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (13, 29)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    t = compute_distance(qf, gf, metric=metric, normalize=normalize, as_numpy=False)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    with pytest.raises(ValueError, match="metric"):
        compute_distance(qf, gf, metric="manhattan")


def _clusters(seed=0, n_ids=20, q_per=2, g_per=6, noise=0.9, dim=32):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    qp, gp = np.arange(n_ids).repeat(q_per), np.arange(n_ids).repeat(g_per)
    qf = centres[qp] + noise * rng.normal(size=(len(qp), dim))
    gf = centres[gp] + noise * rng.normal(size=(len(gp), dim))
    return (torch.tensor(qf, dtype=torch.float32), torch.tensor(gf, dtype=torch.float32), qp, gp,
            np.zeros(len(qp), int), np.ones(len(gp), int))


def test_re_ranking_sanity() -> None:
    qf, gf, qp, gp, qc, gc = _clusters()
    qg, qq, gg = compute_distance(qf, gf), compute_distance(qf, qf), compute_distance(gf, gf)
    out = re_ranking(qg, qq, gg)
    assert out.shape == qg.shape and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, re_ranking(qg, qq, gg))  # deterministic
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()
    # lambda = 1: only the (row-normalised) original distance, same ranking as before
    only_orig = re_ranking(qg, qq, gg, lambda_value=1.0)
    np.testing.assert_allclose(only_orig, qg / np.concatenate([qq, qg], 1).max(1, keepdims=True), rtol=1e-6)
    # a query duplicated exactly gets the same re-ranked row
    qf2 = torch.cat([qf, qf[:1]])
    out2 = re_ranking(compute_distance(qf2, gf), compute_distance(qf2, qf2), gg)
    np.testing.assert_allclose(out2[-1], out2[0], atol=1e-6)
    assert np.array_equal(np.argsort(out2[-1], kind="stable"), np.argsort(out2[0], kind="stable"))
    base = evaluate_reid(qg, qp, gp, qc, gc)
    rr = evaluate_reid(out, qp, gp, qc, gc)
    assert rr["mAP"] >= base["mAP"] and rr["mAP"] > 0.9
    with pytest.raises(ValueError, match="shapes"):
        re_ranking(qg, qq, gg[:-1, :-1])


def test_eval_reid_features() -> None:
    qf, gf, qp, gp, qc, gc = _clusters(noise=0.5)
    res = eval_reid_features(qf, gf, qp, gp, qc, gc, max_rank=5)
    assert len(res["cmc"]) == 5 and res["rank1"] == res["cmc"][0] and res["rank5"] == res["cmc"][4]
    assert res["rank1"] <= res["rank5"] <= res["rank10"] <= 1.0 and not res["reranked"]
    direct = evaluate_reid(compute_distance(qf, gf), qp, gp, qc, gc)
    assert res["mAP"] == direct["mAP"] and res["rank10"] == direct["cmc"][9]
    rr = eval_reid_features(qf, gf, qp, gp, qc, gc, rerank=True, rerank_kwargs={"k1": 10, "k2": 3})
    assert rr["reranked"] and 0 < rr["mAP"] <= 1


@needs_shared
def test_end_to_end_market1501_mini() -> None:
    from dcal.data import build_dataset

    root = str(SHARED / "market1501_mini")
    query, gallery = build_dataset("market1501", root, "query"), build_dataset("market1501", root, "gallery")

    def colour_hist(ds) -> torch.Tensor:
        feats = []
        for i in range(len(ds)):
            image, _, _ = ds[i]
            x = np.asarray(image.resize((16, 32)), dtype=np.int64) // 64  # 4 levels per channel
            top, bottom = x[:16].reshape(-1, 3), x[16:].reshape(-1, 3)
            h = [np.bincount(p[:, 0] * 16 + p[:, 1] * 4 + p[:, 2], minlength=64) for p in (top, bottom)]
            feats.append(np.concatenate(h).astype(np.float32))
        return torch.from_numpy(np.stack(feats))

    res = eval_reid_features(colour_hist(query), colour_hist(gallery), query.pids, gallery.pids,
                             query.camids, gallery.camids)
    assert (res["num_valid_queries"], res["num_skipped_queries"]) == (30, 2)
    assert np.isfinite([res["mAP"], res["mINP"], res["rank1"]]).all()
    assert 0 < res["mINP"] <= res["mAP"] <= 1 and 0 <= res["rank1"] <= res["rank10"] <= 1
    assert len(res["cmc"]) == 32  # gallery of 32 < max_rank 50
