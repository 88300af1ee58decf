"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), on dense matrices or on a sparse neighbour graph.

On the joint set of N = Q + G images (distance d, each row divided by its maximum): N(p, k) = the k + 1
nearest images of p (p itself included, ties by index); R(p, k) = {g in N(p, k) : p in N(g, k)};
R*(p, k1) = R(p, k1) united with every R(q, round(k1/2)), q in R(p, k1), that shares at least 2/3 of its
members with R(p, k1); V_p = exp(-d(p, .)) on R*(p, k1), 0 elsewhere, normalised to sum 1; local query
expansion V_p <- mean of V_q over the k2 nearest q of p (k2 = 1: none); Jaccard distance
d_J(p, g) = 1 - sum_j min(V_pj, V_gj) / sum_j max(V_pj, V_gj); result ``(1 - lambda) * d_J + lambda * d`` on
the query x gallery block.

Everything the method reads is sparse: the k1 + 1 nearest neighbours of every image, each row's maximum, the
distances of the pairs (p, j), j in R*(p), and d_J, which is below 1 only where V_q and V_g share an image; for
every other pair d_J = 1 and the result is ``(1 - lambda) + lambda * d``, a function of the plain distance.
:class:`RerankedDistances` therefore streams the joint distances once (tile by tile: neighbours and maxima),
reads the R* pairs from the tiles that hold them, and computes d_J only for the query x gallery pairs that
share an image: memory O(N * k1^2), never N x N, and the same float32 distances as :func:`re_ranking` on the
dense matrices, to the bit (both read the same tiles and run the same sparse steps in the same order).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import sparse

from dcal.metrics.distance import (
    _KEY_PAD,
    TILE_COLS,
    TILE_ROWS,
    FeatureDistances,
    _block_shape,
    _exact_in_float32,
    _fill_keys,
    _to_numpy,
)


def _row_keys(rows32: np.ndarray, col_index: np.ndarray) -> np.ndarray:
    """(value, column) keys of a block of rows; ``col_index``: the joint index of each column."""
    n, m = rows32.shape
    keys = np.empty((n, m), np.int64)
    buf = np.empty((n, m), np.float32)
    _exact_in_float32(rows32, buf)
    _fill_keys(buf, keys, np.empty((n, m), np.int32), col_index)
    return keys


def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    return np.partition(keys, k - 1, axis=1)[:, :k] if keys.shape[1] > k else keys


def _params(n: int, k1: int, k2: int) -> tuple[int, int, int]:
    k1 = max(1, min(int(k1), n - 1))
    k2 = max(1, min(int(k2), k1 + 1))
    return k1, k2, int(np.around(k1 / 2.0))


def _weights(nbr: np.ndarray, row_max: np.ndarray, dist_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
             k1: int, k2: int, kh: int) -> sparse.csr_matrix:
    """V (N x N, sparse): R*(p, k1) weighted by exp(-d), rows summing to 1, then the k2 local query expansion.
    ``dist_at(i, j)``: the joint distances of index pairs."""
    n = len(nbr)

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
    i, j = rstar.row.astype(np.int64), rstar.col.astype(np.int64)
    w = np.exp(-(dist_at(i, j) / row_max[i])).astype(np.float64)
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
    return v


def _jaccard(v: sparse.csr_matrix, nq: int) -> sparse.csr_matrix:
    """d_J(q, g) (Q x G, float32, sparse) for the query x gallery pairs whose V share an image; every other
    pair's d_J is 1. Sums run in the same order as a dense accumulation would (bincount in array order)."""
    n = v.shape[0]
    ng = n - nq
    vt = v.T.tocsr()  # row j: the images with a non-zero weight on j
    vsum = np.asarray(v.sum(1)).ravel()
    rows, cols, vals = [], [], []
    qblock = max(1, (64 << 20) // (8 * n))
    for a in range(0, nq, qblock):
        b = min(a + qblock, nq)
        vq = v[a:b]
        owner = np.repeat(np.arange(b - a), np.diff(vq.indptr))
        sub = vt[vq.indices]
        per = np.diff(sub.indptr)
        mins = np.minimum(sub.data, np.repeat(vq.data, per))
        idx = np.repeat(owner, per) * n + sub.indices
        gal = sub.indices >= nq
        pairs, inv = np.unique(idx[gal], return_inverse=True)
        smin = np.bincount(inv, weights=mins[gal], minlength=len(pairs))
        qi, gi = pairs // n + a, pairs % n
        denom = vsum[qi] + vsum[gi] - smin
        with np.errstate(divide="ignore", invalid="ignore"):
            vals.append(np.where(denom > 0, 1.0 - smin / denom, 1.0).astype(np.float32))
        rows.append(qi)
        cols.append(gi - nq)
    cat = lambda x, t: np.concatenate(x) if x else np.zeros(0, t)  # noqa: E731
    return sparse.csr_matrix((cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))), shape=(nq, ng))


def _combine(jaccard: np.ndarray, original: np.ndarray, lambda_value: float) -> np.ndarray:
    return ((1.0 - lambda_value) * jaccard + lambda_value * original).astype(np.float32)


def re_ranking(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (module doc) of dense matrices; returns the new ``(Q, G)`` float32 distances.

    Memory: the inputs are the full joint matrix, O((Q + G)^2) float32 (g_g_dist alone is G^2: 1 GB for
    Market-1501, 27 GB for MSMT17); for features, :class:`RerankedDistances` gives the same distances without
    it.
    """
    qg = _to_numpy(q_g_dist).astype(np.float32, copy=False)
    qq = _to_numpy(q_q_dist).astype(np.float32, copy=False)
    gg = _to_numpy(g_g_dist).astype(np.float32, copy=False)
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(f"shapes {qg.shape}, {qq.shape}, {gg.shape} are not (Q,G), (Q,Q), (G,G)")
    n = nq + ng
    k1, k2, kh = _params(n, k1, k2)

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
        keys = np.sort(_smallest(_row_keys(rows, np.arange(n, dtype=np.int64)), k1 + 1), axis=1)
        nbr[a:b] = keys & 0xFFFFFFFF
    row_max[row_max <= 0] = 1.0

    def dist_at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        out = np.empty(i.shape, np.float32)
        iq, jq = i < nq, j < nq
        out[iq & jq] = qq[i[iq & jq], j[iq & jq]]
        out[iq & ~jq] = qg[i[iq & ~jq], j[iq & ~jq] - nq]
        out[~iq & ~jq] = gg[i[~iq & ~jq] - nq, j[~iq & ~jq] - nq]
        out[~iq & jq] = qg[j[~iq & jq], i[~iq & jq] - nq]
        return out

    jac = _jaccard(_weights(nbr, row_max, dist_at, k1, k2, kh), nq)
    jaccard = np.ones((nq, ng), np.float32)
    coo = jac.tocoo()
    jaccard[coo.row, coo.col] = coo.data
    return _combine(jaccard, qg / row_max[:nq, None], lambda_value)


class RerankedDistances:
    """The re-ranked query x gallery distances of two feature sets (a distance source for the streaming evaluator
    and the search, like :class:`dcal.metrics.reid.FeatureDistances`), computed from the sparse neighbour graph
    (module doc): equal to :func:`re_ranking` of the dense matrices, in O(N * k1^2) memory plus one block of about
    ``chunk_size`` distances."""

    def __init__(self, base: FeatureDistances, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 chunk_size: int | None = None) -> None:
        self.base = base
        self.nq, self.ng = base.nq, base.ng
        self.lambda_value = lambda_value
        n = self.nq + self.ng
        k1, k2, kh = _params(n, k1, k2)
        opts = (base.metric, base.normalize)
        self.qq = FeatureDistances(base.q, base.q, *opts)
        self.gg = FeatureDistances(base.g, base.g, *opts)
        self.chunk_size = chunk_size
        nbr, row_max = self._graph(k1 + 1)
        self.row_max = row_max
        self.jaccard = _jaccard(_weights(nbr, row_max, self._dist_at, k1, k2, kh), self.nq)

    def _graph(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest images (joint index, ties by index) and the maximum distance of every joint row,
        streaming the joint matrix block by block."""
        nq, ng = self.nq, self.ng
        n = nq + ng
        row_max = np.empty(n, np.float32)
        nbr = np.empty((n, k), np.int64)

        def scan(a: int, b: int, pieces: list[tuple[Callable[[int, int], np.ndarray], int, int]]) -> None:
            """Rows a..b (joint) from column pieces (block(c0, c1) -> rows x columns, joint offset, length)."""
            best = np.full((b - a, 0), _KEY_PAD, np.int64)
            top = np.full(b - a, -np.inf, np.float32)
            for fetch, offset, length in pieces:
                for c0 in range(0, length, cols):
                    c1 = min(c0 + cols, length)
                    rows = fetch(c0, c1)
                    top = np.maximum(top, rows.max(1))
                    keys = _smallest(_row_keys(rows, np.arange(offset + c0, offset + c1, dtype=np.int64)), k)
                    best = _smallest(np.concatenate([best, keys], axis=1), k)
            row_max[a:b] = top
            nbr[a:b] = np.sort(best, axis=1) & 0xFFFFFFFF

        rows_q, cols = _block_shape(max(nq, ng), n, self.chunk_size)
        for a in range(0, nq, rows_q):  # query rows: d(q, q) then d(q, g)
            b = min(a + rows_q, nq)
            scan(a, b, [(lambda c0, c1, a=a, b=b: self.qq.block((a, b), (c0, c1)), 0, nq),
                        (lambda c0, c1, a=a, b=b: self.base.block((a, b), (c0, c1)), nq, ng)])
        rows_g = max(TILE_COLS, rows_q // TILE_COLS * TILE_COLS)  # d(g, q) is d(q, g) transposed: whole column tiles
        for a in range(0, ng, rows_g):
            b = min(a + rows_g, ng)
            q_side = [(lambda c0, c1, a=a, b=b: self.base.block((c0, c1), (a, b)).T, 0, nq)]
            scan(nq + a, nq + b, q_side + [(lambda c0, c1, a=a, b=b: self.gg.block((a, b), (c0, c1)), nq, ng)])
        row_max[row_max <= 0] = 1.0
        return nbr, row_max

    def _dist_at(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Joint distances of index pairs, read from the tiles that hold them (the dense matrices' values)."""
        nq = self.nq
        out = np.empty(i.shape, np.float32)
        iq, jq = i < nq, j < nq
        parts = ((iq & jq, self.qq, i, j, 0, 0), (iq & ~jq, self.base, i, j, 0, nq),
                 (~iq & ~jq, self.gg, i, j, nq, nq), (~iq & jq, self.base, j, i, 0, nq))
        for sel, src, r, c, dr, dc in parts:
            where = np.flatnonzero(sel)
            r, c = r[where] - dr, c[where] - dc
            tile = (r // TILE_ROWS) * (src.ng // TILE_COLS + 1) + c // TILE_COLS
            order = np.argsort(tile, kind="stable")
            bounds = np.flatnonzero(np.diff(tile[order])) + 1
            for grp in np.split(order, bounds):
                if not len(grp):
                    continue
                r0, c0 = int(r[grp[0]]) // TILE_ROWS * TILE_ROWS, int(c[grp[0]]) // TILE_COLS * TILE_COLS
                blk = src.block((r0, min(r0 + TILE_ROWS, src.nq)), (c0, min(c0 + TILE_COLS, src.ng)))
                out[where[grp]] = blk[r[grp] - r0, c[grp] - c0]
        return out

    def block(self, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        (r0, r1), (c0, c1) = rows, cols
        original = self.base.block(rows, cols) / self.row_max[r0:r1, None]
        jaccard = np.ones((r1 - r0, c1 - c0), np.float32)
        sub = self.jaccard[r0:r1, c0:c1].tocoo()
        jaccard[sub.row, sub.col] = sub.data
        return _combine(jaccard, original, self.lambda_value)
