"""Re-identification evaluation: distances, CMC / mAP / mINP (Market-1501 protocol) and k-reciprocal re-ranking.

Protocol (``evaluate_reid``), as torchreid's / fast-reid's ``eval_market1501``:

* each query ranks the whole gallery by ascending distance; ties are broken by gallery index (the order of
  a *stable* sort, ``np.argsort(..., kind="stable")``);
* gallery items with the query's identity **and** camera are removed from that query's ranking;
* gallery items with identity ``-1`` (junk) are removed from every ranking. torchreid keeps them as
  non-matches (Market's own loaders drop them before evaluating, so there the results agree); without any
  ``-1`` in the gallery the results here equal ``eval_market1501``'s (up to float summation order, 1e-12);
* queries left without a true match are skipped and counted (``num_skipped_queries``);
* CMC@k: fraction of valid queries whose first true match is within the first k; AP = mean over the true
  matches of the precision at their rank, over the *whole* ranking (``max_rank`` only truncates CMC);
  INP = (#true matches) / (1 + position of the last true match); mAP / mINP = means over valid queries.

``torchreid`` sorts with ``np.argsort``'s default (unstable) quicksort, so with tied distances its order, and
possibly its numbers, are implementation-defined; here they are fixed by gallery index.

The evaluator never sorts indices: each chunk of queries sorts 64-bit keys (float32 distance bits << 32 |
gallery index, which orders by distance then index exactly) with numpy's SIMD sort, and finds the rank of
each same-identity gallery item by binary search. An MSMT17-sized problem (11,659 x 82,161) takes about
ten seconds on two cores on top of the distance matrix.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

__all__ = [
    "NoValidQueryError",
    "compute_distance",
    "evaluate_reid",
    "re_ranking",
    "eval_reid_features",
    "reid_scores",
]

DISTANCE_METRICS = ("euclidean", "sqeuclidean", "cosine")
_KEY_PAD = np.iinfo(np.int64).max
_FLOAT32_EXACT_INT = 1 << 24


class NoValidQueryError(ValueError):
    """No query has a true match in the gallery (under another camera), so nothing can be evaluated."""


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _ids(x: Any, n: int, what: str) -> np.ndarray:
    arr = _to_numpy(x).astype(np.int64, copy=False).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{what} has {arr.shape[0]} entries, the distance matrix has {n} along that axis")
    return arr


# --------------------------------------------------------------------------------------------- distance
def compute_distance(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    metric: str = "euclidean",
    normalize: bool = True,
    chunk_size: int = 4096,
    as_numpy: bool = True,
) -> np.ndarray | torch.Tensor:
    """Query x gallery distance matrix, float32, on the CPU.

    Args:
        query_features, gallery_features: ``(Q, D)`` and ``(G, D)`` features (any device; computed there in
            float32, ``chunk_size`` query rows at a time, and gathered on the CPU).
        metric: ``"euclidean"`` (default) ``||q - g||``; ``"sqeuclidean"`` ``||q - g||^2`` (what torchreid's
            and TransReID's ``euclidean`` return; same ranking); ``"cosine"`` ``1 - cos(q, g)``.
        normalize: L2-normalise the features first (the default, the project's re-id distance). Ignored by
            ``"cosine"``, which is scale-free.
        as_numpy: return a numpy array (default) or a CPU torch tensor (sharing memory).
    """
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {DISTANCE_METRICS}")
    q = torch.as_tensor(query_features).detach().float()
    g = torch.as_tensor(gallery_features).detach().float().to(q.device)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D), got {tuple(q.shape)} and {tuple(g.shape)}")
    if normalize or metric == "cosine":
        q = F.normalize(q, dim=1)
        g = F.normalize(g, dim=1)
    out = torch.empty((q.shape[0], g.shape[0]), dtype=torch.float32)
    gt = g.t()
    g2 = (g * g).sum(1).unsqueeze(0) if metric != "cosine" else None
    q2 = (q * q).sum(1) if metric != "cosine" else None
    on_cpu = q.device.type == "cpu"
    for a in range(0, q.shape[0], max(1, int(chunk_size))):
        b = min(a + max(1, int(chunk_size)), q.shape[0])
        d = out[a:b] if on_cpu else torch.empty((b - a, g.shape[0]), device=q.device)
        if metric == "cosine":
            torch.mm(q[a:b], gt, out=d)
            d.neg_().add_(1.0)
        else:
            torch.addmm(g2.expand(b - a, -1), q[a:b], gt, beta=1.0, alpha=-2.0, out=d)
            d.add_(q2[a:b].unsqueeze(1)).clamp_(min=0.0)
            if metric == "euclidean":
                d.sqrt_()
        if not on_cpu:
            out[a:b].copy_(d)
    return out.numpy() if as_numpy else out


# ------------------------------------------------------------------------------------------ sort keys
def _fill_keys(values32: np.ndarray, keys: np.ndarray, scratch: np.ndarray, col_index: np.ndarray) -> None:
    """``keys = order-preserving int32 image of values32 << 32 | column``: unique keys whose order is the
    order of (distance, column). ``values32`` must hold no ``-0.0`` (see :func:`_exact_in_float32`)."""
    bits = values32.view(np.int32)
    if values32.size and values32.min() < 0:
        np.right_shift(bits, 31, out=scratch)
        np.bitwise_and(scratch, 0x7FFFFFFF, out=scratch)
        np.bitwise_xor(scratch, bits, out=scratch)  # negative floats: flip the magnitude bits
        bits = scratch
    np.left_shift(bits, np.int64(32), out=keys)  # non-negative floats: the bit pattern is already ordered
    np.bitwise_or(keys, col_index, out=keys)


def _exact_in_float32(chunk: np.ndarray, buf32: np.ndarray) -> bool:
    """Write ``chunk + 0.0`` (so ``-0.0`` becomes ``+0.0``: equal values, equal bits) into ``buf32``; True when
    that float32 copy is exact, so that float32 keys order the chunk exactly."""
    if chunk.dtype.kind in "iub" and chunk.size:
        if chunk.min() < -_FLOAT32_EXACT_INT or chunk.max() > _FLOAT32_EXACT_INT:
            return False
    np.add(chunk, 0.0, out=buf32, casting="unsafe")
    if chunk.dtype.kind == "f" and chunk.dtype.itemsize > 4:
        return bool(np.array_equal(buf32, chunk))
    return True


# ------------------------------------------------------------------------------------------- evaluate
class _Evaluator:
    def __init__(self, distmat: np.ndarray, q_pids, g_pids, q_camids, g_camids) -> None:
        self.d = distmat
        nq, ng = distmat.shape
        self.q_pids, self.q_cams = q_pids, q_camids
        self.g_pids, self.g_cams = g_pids, g_camids
        self.junk = np.flatnonzero(g_pids == -1)
        keep = np.flatnonzero(g_pids != -1)
        self.keep = keep
        self.num_g = len(keep)
        # Gallery (without junk) grouped by identity, each group in gallery order.
        order = keep[np.argsort(g_pids[keep], kind="stable")]
        self.order = order
        upids, starts, counts = np.unique(g_pids[order], return_index=True, return_counts=True)
        gi = np.searchsorted(upids, q_pids).clip(max=max(len(upids) - 1, 0))
        found = (upids[gi] == q_pids) if len(upids) else np.zeros(nq, bool)
        self.q_start = np.where(found, starts[gi] if len(upids) else 0, 0)
        self.q_count = np.where(found, counts[gi] if len(upids) else 0, 0)
        self.col_index = np.arange(ng, dtype=np.int64)

    def positions_fast(self, chunk32: np.ndarray, cols: np.ndarray, inmask: np.ndarray,
                       keys: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Rank (0-based, among non-junk gallery items, stable) of the gallery items ``cols`` per row."""
        _fill_keys(chunk32, keys, scratch, self.col_index)
        if len(self.junk):
            keys[:, self.junk] = _KEY_PAD
        rows = np.arange(len(keys))[:, None]
        kg = keys[rows, cols]
        kg[~inmask] = _KEY_PAD
        keys.sort(axis=1)
        return torch.searchsorted(torch.from_numpy(keys), torch.from_numpy(kg)).numpy()

    def positions_stable(self, chunk: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Same as ``positions_fast`` by a stable argsort (for distances float32 cannot hold exactly)."""
        sub = chunk[:, self.keep] if len(self.junk) else chunk
        order = np.argsort(sub, axis=1, kind="stable")
        inv = np.empty_like(order)
        np.put_along_axis(inv, order, np.arange(sub.shape[1])[None, :], axis=1)
        kept_index = np.full(self.d.shape[1], 0, dtype=np.int64)
        kept_index[self.keep] = np.arange(self.num_g)
        return np.take_along_axis(inv, kept_index[cols], axis=1)

    def run_chunk(self, a: int, b: int, bufs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        chunk = self.d[a:b]
        if chunk.dtype.kind == "f" and np.isnan(chunk).any():
            raise ValueError(f"the distance matrix holds NaN (query rows {a}..{b - 1})")
        n = b - a
        count = self.q_count[a:b]
        width = max(int(count.max()) if n else 0, 1)
        ar = np.arange(width)
        inmask = ar[None, :] < count[:, None]
        cols = self.order[np.minimum(self.q_start[a:b, None] + ar[None, :], max(len(self.order) - 1, 0))] \
            if len(self.order) else np.zeros((n, width), np.int64)
        same_cam = self.g_cams[cols] == self.q_cams[a:b, None]
        is_match = inmask & ~same_cam
        is_inval = inmask & same_cam
        if not is_match.any():
            z = np.zeros(n)
            return z, z, np.zeros(n, bool), np.zeros(n, np.int64)
        buf32 = bufs["f32"][:n]
        if _exact_in_float32(chunk, buf32):
            pos = self.positions_fast(buf32, cols, inmask, bufs["keys"][:n], bufs["i32"][:n])
        else:
            pos = self.positions_stable(chunk, cols)
        pos = np.where(inmask, pos, self.d.shape[1] + ar[None, :])  # padding sorts last
        srt = np.argsort(pos, axis=1)
        pos = np.take_along_axis(pos, srt, axis=1)
        is_match = np.take_along_axis(is_match, srt, axis=1)
        is_inval = np.take_along_axis(is_inval, srt, axis=1)
        inval_before = np.cumsum(is_inval, axis=1) - is_inval
        vpos = pos - inval_before  # 0-based position in the query's filtered ranking
        k = np.cumsum(is_match, axis=1)  # 1-based rank of each true match among the true matches
        nrel = is_match.sum(1)
        valid = nrel > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(is_match, k / (vpos + 1.0), 0.0)
            ap = prec.sum(1) / nrel
            last = np.where(is_match, vpos, -1).max(1)
            inp = nrel / (last + 1.0)
        first = np.where(is_match, vpos, np.iinfo(np.int64).max).min(1)
        return np.where(valid, ap, 0.0), np.where(valid, inp, 0.0), valid, first


def evaluate_reid(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    chunk_size: int | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query x gallery distance matrix under the Market-1501 protocol (module doc).

    Args:
        distmat: ``(Q, G)`` distances (numpy or torch; float32 is the fast path; float64 values that float32
            cannot hold exactly go through a stable argsort, several times slower). NaN is rejected.
        q_pids, g_pids, q_camids, g_camids: integer ids; gallery pid ``-1`` is junk.
        max_rank: length of the CMC curve (lowered, with a warning, to the number of non-junk gallery
            items when that is smaller, as torchreid does). Does not affect mAP/mINP.
        chunk_size: queries per chunk (default: ~16 MB of sort keys per chunk and thread).
        num_threads: worker threads over chunks (default: ``min(torch.get_num_threads(), os.cpu_count())``).

    Returns:
        ``cmc`` (float32 array of length ``max_rank``, as torchreid's), ``mAP``, ``mINP`` (floats in [0, 1]),
        ``num_valid_queries``, ``num_skipped_queries`` (ints).

    Raises:
        NoValidQueryError: no query has a true match.
    """
    d = _to_numpy(distmat)
    if d.ndim != 2:
        raise ValueError(f"distmat must be (num_query, num_gallery), got shape {d.shape}")
    nq, ng = d.shape
    q_pids = _ids(q_pids, nq, "q_pids")
    q_camids = _ids(q_camids, nq, "q_camids")
    g_pids = _ids(g_pids, ng, "g_pids")
    g_camids = _ids(g_camids, ng, "g_camids")
    ev = _Evaluator(d, q_pids, g_pids, q_camids, g_camids)
    if ev.num_g == 0:
        raise NoValidQueryError("the gallery is empty (or only junk, pid -1)")
    if ev.num_g < max_rank:
        warnings.warn(f"gallery has only {ev.num_g} items; max_rank lowered to {ev.num_g}", stacklevel=2)
        max_rank = ev.num_g
    if chunk_size is None:
        chunk_size = max(1, (16 << 20) // (8 * max(ng, 1)))
    chunk_size = max(1, int(chunk_size))
    if num_threads is None:
        num_threads = min(torch.get_num_threads(), os.cpu_count() or 1)
    bounds = [(a, min(a + chunk_size, nq)) for a in range(0, nq, chunk_size)]
    num_threads = max(1, min(int(num_threads), len(bounds)))
    rows = min(chunk_size, nq)

    ap = np.zeros(nq)
    inp = np.zeros(nq)
    valid = np.zeros(nq, dtype=bool)
    first = np.zeros(nq, dtype=np.int64)

    def work(worker: int) -> None:
        bufs = {
            "f32": np.empty((rows, ng), np.float32),
            "i32": np.empty((rows, ng), np.int32),
            "keys": np.empty((rows, ng), np.int64),
        }
        for a, b in bounds[worker::num_threads]:
            ap[a:b], inp[a:b], valid[a:b], first[a:b] = ev.run_chunk(a, b, bufs)

    if num_threads == 1:
        work(0)
    else:
        with ThreadPoolExecutor(num_threads) as pool:
            for f in [pool.submit(work, w) for w in range(num_threads)]:
                f.result()

    num_valid = int(valid.sum())
    if num_valid == 0:
        raise NoValidQueryError(
            f"none of the {nq} queries has a true match in the gallery under another camera "
            "(do query and gallery come from the same dataset?)"
        )
    hits = np.bincount(first[valid & (first < max_rank)], minlength=max_rank)[:max_rank]
    cmc = np.cumsum(hits).astype(np.float32) / np.float32(num_valid)
    return {
        "cmc": cmc,
        "mAP": float(np.mean(ap[valid])),
        "mINP": float(np.mean(inp[valid])),
        "num_valid_queries": num_valid,
        "num_skipped_queries": nq - num_valid,
    }


def reid_scores(res: dict[str, Any]) -> dict[str, Any]:
    """The Re-ID numbers as dcal writes them everywhere (``metrics.jsonl``, ``dcal eval --json``, ``dcal search``'s
    ``metrics.json``, the console): ``mAP``, ``rank1``, ``rank5``, ``rank10``, ``mINP`` in percent and
    ``num_skipped_queries``, from the result of :func:`evaluate_reid` or :func:`eval_reid_features` (whose
    fractions stay fractions, as torchreid's)."""
    cmc = np.asarray(res["cmc"])
    ranks = {f"rank{k}": float(res.get(f"rank{k}", cmc[min(k, len(cmc)) - 1])) for k in (1, 5, 10)}
    out = {"mAP": res["mAP"], **ranks, "mINP": res["mINP"]}
    return {**{k: 100.0 * float(v) for k, v in out.items()}, "num_skipped_queries": int(res["num_skipped_queries"])}


# ----------------------------------------------------------------------------------------- re-ranking
def _topk_stable(rows32: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest values of each row, ordered by (value, column)."""
    n, m = rows32.shape
    keys = np.empty((n, m), np.int64)
    buf = np.empty((n, m), np.float32)
    _exact_in_float32(rows32, buf)
    _fill_keys(buf, keys, np.empty((n, m), np.int32), np.arange(m, dtype=np.int64))
    if k < m:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    return (keys & 0xFFFFFFFF).astype(np.int64)


def re_ranking(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017); returns the new ``(Q, G)`` float32 distances.

    On the joint set of N = Q + G images (distance d, each row divided by its maximum): N(p, k) = the k + 1
    nearest images of p (p itself included, ties by index); R(p, k) = {g in N(p, k) : p in N(g, k)};
    R*(p, k1) = R(p, k1) united with every R(q, round(k1/2)), q in R(p, k1), that shares at least 2/3 of its
    members with R(p, k1); V_p = exp(-d(p, .)) on R*(p, k1), 0 elsewhere, normalised to sum 1; local query
    expansion V_p <- mean of V_q over the k2 nearest q of p (k2 = 1: none); Jaccard distance
    d_J(p, g) = 1 - sum_j min(V_pj, V_gj) / sum_j max(V_pj, V_gj); result
    ``(1 - lambda_value) * d_J + lambda_value * d`` on the query x gallery block.

    Memory: the inputs are the full joint matrix, O((Q + G)^2) float32 (g_g_dist alone is G^2: 1 GB for
    Market-1501, 27 GB for MSMT17), plus O((Q + G) * k1^2) sparse entries and ~256 MB blocks; it is meant
    for Market / Duke / VeRi-sized problems.
    """
    qg = _to_numpy(q_g_dist).astype(np.float32, copy=False)
    qq = _to_numpy(q_q_dist).astype(np.float32, copy=False)
    gg = _to_numpy(g_g_dist).astype(np.float32, copy=False)
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(f"shapes {qg.shape}, {qq.shape}, {gg.shape} are not (Q,G), (Q,Q), (G,G)")
    n = nq + ng
    k1 = max(1, min(int(k1), n - 1))
    k2 = max(1, min(int(k2), k1 + 1))
    kh = int(np.around(k1 / 2.0))

    def joint_rows(a: int, b: int) -> np.ndarray:
        if b <= nq:
            return np.concatenate([qq[a:b], qg[a:b]], axis=1)
        if a >= nq:
            return np.concatenate([qg[:, a - nq : b - nq].T, gg[a - nq : b - nq]], axis=1)
        return np.concatenate([joint_rows(a, nq), joint_rows(nq, b)], axis=0)

    # Row maxima and the k1 + 1 nearest neighbours of every image, block by block.
    row_max = np.empty(n, np.float32)
    nbr = np.empty((n, k1 + 1), np.int64)
    block = max(1, (256 << 20) // (16 * n))
    for a in range(0, n, block):
        b = min(a + block, n)
        rows = joint_rows(a, b)
        row_max[a:b] = rows.max(1)
        nbr[a:b] = _topk_stable(rows, k1 + 1)
    row_max[row_max <= 0] = 1.0

    def dist_at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Normalised joint distance d(i, j) for index arrays i, j."""
        out = np.empty(i.shape, np.float32)
        iq, jq = i < nq, j < nq
        for sel, src, di, dj in (
            (iq & jq, qq, 0, 0), (iq & ~jq, qg, 0, nq), (~iq & ~jq, gg, nq, nq), (~iq & jq, None, nq, 0)
        ):
            if src is None:
                out[sel] = qg[j[sel], i[sel] - nq]
            else:
                out[sel] = src[i[sel] - di, j[sel] - dj]
        return out / row_max[i]

    def neighbours(k: int) -> sparse.csr_matrix:
        data = np.ones(n * (k + 1), np.float32)
        return sparse.csr_matrix((data, nbr[:, : k + 1].reshape(-1), np.arange(0, n * (k + 1) + 1, k + 1)),
                                 shape=(n, n))

    def reciprocal(k: int) -> sparse.csr_matrix:
        nk = neighbours(k)
        return nk.multiply(nk.T).tocsr()

    r1 = reciprocal(k1)
    rh = reciprocal(kh) if kh >= 1 else sparse.identity(n, np.float32, format="csr")
    size_h = np.asarray(rh.sum(1)).ravel()
    overlap = (rh @ r1.T).T.tocsr()  # overlap[p, q] = |R(q, k1/2) & R(p, k1)|
    cand = overlap.multiply(r1).tocoo()  # only q in R(p, k1)
    ok = cand.data >= (2.0 / 3.0) * size_h[cand.col] - 1e-9
    accept = sparse.csr_matrix((np.ones(int(ok.sum()), np.float32), (cand.row[ok], cand.col[ok])), shape=(n, n))
    rstar = ((r1 + accept @ rh) > 0).tocoo()
    w = np.exp(-dist_at(rstar.row.astype(np.int64), rstar.col.astype(np.int64))).astype(np.float64)
    v = sparse.csr_matrix((w, (rstar.row, rstar.col)), shape=(n, n))
    sums = np.asarray(v.sum(1)).ravel()
    sums[sums == 0] = 1.0
    v = sparse.diags(1.0 / sums) @ v
    if k2 > 1:
        qe = sparse.csr_matrix(
            (np.full(n * k2, 1.0 / k2), nbr[:, :k2].reshape(-1), np.arange(0, n * k2 + 1, k2)), shape=(n, n)
        )
        v = (qe @ v).tocsr()
    v.sort_indices()
    vt = v.T.tocsr()  # row j: the images with a non-zero weight on j
    vsum = np.asarray(v.sum(1)).ravel()

    jaccard = np.empty((nq, ng), np.float32)
    qblock = max(1, (64 << 20) // (8 * n))
    for a in range(0, nq, qblock):
        b = min(a + qblock, nq)
        vq = v[a:b]
        owner = np.repeat(np.arange(b - a), np.diff(vq.indptr))
        sub = vt[vq.indices]
        per = np.diff(sub.indptr)
        mins = np.minimum(sub.data, np.repeat(vq.data, per))
        idx = np.repeat(owner, per) * n + sub.indices
        smin = np.bincount(idx, weights=mins, minlength=(b - a) * n).reshape(b - a, n)[:, nq:]
        denom = vsum[a:b, None] + vsum[None, nq:] - smin
        with np.errstate(divide="ignore", invalid="ignore"):
            jaccard[a:b] = np.where(denom > 0, 1.0 - smin / denom, 1.0)

    original = qg / row_max[:nq, None]
    return ((1.0 - lambda_value) * jaccard + lambda_value * original).astype(np.float32)


# ------------------------------------------------------------------------------------- convenience
def eval_reid_features(
    q_feats: torch.Tensor | np.ndarray,
    g_feats: torch.Tensor | np.ndarray,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    metric: str = "euclidean",
    normalize: bool = True,
    rerank: bool = False,
    max_rank: int = 50,
    rerank_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Distances (:func:`compute_distance`), optional re-ranking (:func:`re_ranking`, k1=20, k2=6,
    lambda=0.3 unless ``rerank_kwargs`` says otherwise) and :func:`evaluate_reid`.

    Returns ``evaluate_reid``'s dict plus ``rank1``, ``rank5``, ``rank10`` (floats; rank-k beyond the gallery
    size is the last CMC value) and ``reranked``.
    """
    distmat = compute_distance(q_feats, g_feats, metric=metric, normalize=normalize)
    if rerank:
        qq = compute_distance(q_feats, q_feats, metric=metric, normalize=normalize)
        gg = compute_distance(g_feats, g_feats, metric=metric, normalize=normalize)
        distmat = re_ranking(distmat, qq, gg, **(rerank_kwargs or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate_reid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max(max_rank, 10))
    cmc = res["cmc"]
    for k in (1, 5, 10):
        res[f"rank{k}"] = float(cmc[min(k, len(cmc)) - 1])
    res["cmc"] = cmc[: max_rank]
    res["reranked"] = bool(rerank)
    return res

