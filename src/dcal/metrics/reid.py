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

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dcal.metrics.distance import (
    _KEY_PAD,
    FeatureDistances,
    _block_shape,
    _exact_in_float32,
    _fill_keys,
    _to_numpy,
    _unsortable,
    available_memory,
    compute_distance,
)

logger = logging.getLogger(__name__)

__all__ = [
    "NoValidQueryError",
    "FeatureDistances",
    "compute_distance",
    "distance_source",
    "evaluate_distances",
    "evaluate_reid",
    "eval_reid_features",
    "nearest_gallery",
    "reid_scores",
]



class NoValidQueryError(ValueError):
    """No query has a true match in the gallery (under another camera), so nothing can be evaluated."""


def _ids(x: Any, n: int, what: str) -> np.ndarray:
    arr = _to_numpy(x).astype(np.int64, copy=False).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{what} has {arr.shape[0]} entries, the distance matrix has {n} along that axis")
    return arr


# ------------------------------------------------------------------------------------------- evaluate
class _Groups:
    """The protocol's bookkeeping: for each query, the gallery items of its identity (junk removed), in gallery
    order; those under another camera are its true matches, those under its camera are removed."""

    def __init__(self, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray) -> None:
        nq, ng = len(q_pids), len(g_pids)
        self.q_pids, self.q_cams = q_pids, q_camids
        self.g_pids, self.g_cams = g_pids, g_camids
        self.ng = ng
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

    def same_identity(self, a: int, b: int) -> tuple[np.ndarray, ...]:
        """For queries a..b-1: ``cols`` (n, W) gallery items of the query's identity (padded), ``inmask`` (the
        real ones), ``is_match`` (another camera) and ``is_inval`` (the query's camera: removed)."""
        n = b - a
        count = self.q_count[a:b]
        width = max(int(count.max()) if n else 0, 1)
        ar = np.arange(width)
        inmask = ar[None, :] < count[:, None]
        cols = self.order[np.minimum(self.q_start[a:b, None] + ar[None, :], max(len(self.order) - 1, 0))] \
            if len(self.order) else np.zeros((n, width), np.int64)
        same_cam = self.g_cams[cols] == self.q_cams[a:b, None]
        return cols, inmask, inmask & ~same_cam, inmask & same_cam


def _scores(pos: np.ndarray, inmask: np.ndarray, is_match: np.ndarray, is_inval: np.ndarray, ng: int
            ) -> tuple[np.ndarray, ...]:
    """AP, INP, valid, first-hit position and the matches' positions, from ``pos``: each same-identity item's
    0-based position among the non-junk gallery items (stable order)."""
    ar = np.arange(pos.shape[1])
    pos = np.where(inmask, pos, ng + ar[None, :])  # padding sorts last
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
    return np.where(valid, ap, 0.0), np.where(valid, inp, 0.0), valid, first, vpos[is_match], nrel


class _Dense:
    """Positions by sorting each query's whole row of a distance matrix (:func:`evaluate_reid`)."""

    def __init__(self, distmat: np.ndarray, groups: _Groups) -> None:
        self.d, self.gr = distmat, groups
        self.col_index = np.arange(distmat.shape[1], dtype=np.int64)

    def positions_fast(self, chunk32: np.ndarray, cols: np.ndarray, inmask: np.ndarray,
                       keys: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Rank (0-based, among non-junk gallery items, stable) of the gallery items ``cols`` per row."""
        _fill_keys(chunk32, keys, scratch, self.col_index)
        if len(self.gr.junk):
            keys[:, self.gr.junk] = _KEY_PAD
        rows = np.arange(len(keys))[:, None]
        kg = keys[rows, cols]
        kg[~inmask] = _KEY_PAD
        keys.sort(axis=1)
        return torch.searchsorted(torch.from_numpy(keys), torch.from_numpy(kg)).numpy()

    def positions_stable(self, chunk: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Same as ``positions_fast`` by a stable argsort (for distances float32 cannot hold exactly)."""
        sub = chunk[:, self.gr.keep] if len(self.gr.junk) else chunk
        order = np.argsort(sub, axis=1, kind="stable")
        inv = np.empty_like(order)
        np.put_along_axis(inv, order, np.arange(sub.shape[1])[None, :], axis=1)
        kept_index = np.full(self.d.shape[1], 0, dtype=np.int64)
        kept_index[self.gr.keep] = np.arange(self.gr.num_g)
        return np.take_along_axis(inv, kept_index[cols], axis=1)

    def run_chunk(self, a: int, b: int, bufs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        chunk = self.d[a:b]
        if chunk.dtype.kind == "f" and np.isnan(chunk).any():
            raise ValueError(f"the distance matrix holds NaN (query rows {a}..{b - 1})")
        n = b - a
        cols, inmask, is_match, is_inval = self.gr.same_identity(a, b)
        if not is_match.any():
            pos = np.zeros(cols.shape, np.int64)
        else:
            buf32 = bufs["f32"][:n]
            if _exact_in_float32(chunk, buf32):
                pos = self.positions_fast(buf32, cols, inmask, bufs["keys"][:n], bufs["i32"][:n])
            else:
                pos = self.positions_stable(chunk, cols)
        return _scores(pos, inmask, is_match, is_inval, self.d.shape[1])


def _check_ids(nq: int, ng: int, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any) -> _Groups:
    return _Groups(_ids(q_pids, nq, "q_pids"), _ids(g_pids, ng, "g_pids"), _ids(q_camids, nq, "q_camids"),
                   _ids(g_camids, ng, "g_camids"))


def _max_rank(groups: _Groups, max_rank: int, quiet: bool = False) -> int:
    if groups.num_g == 0:
        raise NoValidQueryError("the gallery is empty (or only junk, pid -1)")
    if groups.num_g < max_rank:
        if not quiet:
            logger.warning("gallery has only %d items; max_rank lowered to %d", groups.num_g, groups.num_g)
        max_rank = groups.num_g
    return max_rank


def _summary(ap: np.ndarray, inp: np.ndarray, valid: np.ndarray, first: np.ndarray, max_rank: int,
             ranks: list[np.ndarray] | None, nrel: np.ndarray | None) -> dict[str, Any]:
    nq = len(ap)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise NoValidQueryError(
            f"none of the {nq} queries has a true match in the gallery under another camera "
            "(do query and gallery come from the same dataset?)"
        )
    hits = np.bincount(first[valid & (first < max_rank)], minlength=max_rank)[:max_rank]
    cmc = np.cumsum(hits).astype(np.float32) / np.float32(num_valid)
    out = {
        "cmc": cmc,
        "mAP": float(np.mean(ap[valid])),
        "mINP": float(np.mean(inp[valid])),
        "num_valid_queries": num_valid,
        "num_skipped_queries": nq - num_valid,
    }
    if ranks is not None:
        out["match_ranks"] = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
        out["num_matches"] = nrel
    return out


def evaluate_reid(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    chunk_size: int | None = None,
    num_threads: int | None = None,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query x gallery distance matrix under the Market-1501 protocol (module doc).

    For features, :func:`eval_reid_features` evaluates the same way without ever holding the matrix.

    Args:
        distmat: ``(Q, G)`` distances (numpy or torch; float32 is the fast path; float64 values that float32
            cannot hold exactly go through a stable argsort, several times slower). NaN is rejected.
        q_pids, g_pids, q_camids, g_camids: integer ids; gallery pid ``-1`` is junk.
        max_rank: length of the CMC curve (lowered, with a warning, to the number of non-junk gallery
            items when that is smaller, as torchreid does). Does not affect mAP/mINP.
        chunk_size: queries per chunk (default: ~16 MB of sort keys per chunk and thread).
        num_threads: worker threads over chunks (default: ``min(torch.get_num_threads(), os.cpu_count())``).
        return_ranks: also return ``match_ranks`` (the 0-based position of every true match in its query's
            filtered ranking, query by query, ascending) and ``num_matches`` (true matches per query).

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
    groups = _check_ids(nq, ng, q_pids, g_pids, q_camids, g_camids)
    max_rank = _max_rank(groups, max_rank)
    ev = _Dense(d, groups)
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
    nrel = np.zeros(nq, dtype=np.int64)
    ranks: dict[int, np.ndarray] = {}

    def work(worker: int) -> None:
        bufs = {
            "f32": np.empty((rows, ng), np.float32),
            "i32": np.empty((rows, ng), np.int32),
            "keys": np.empty((rows, ng), np.int64),
        }
        for a, b in bounds[worker::num_threads]:
            ap[a:b], inp[a:b], valid[a:b], first[a:b], ranks[a], nrel[a:b] = ev.run_chunk(a, b, bufs)

    if num_threads == 1:
        work(0)
    else:
        with ThreadPoolExecutor(num_threads) as pool:
            for f in [pool.submit(work, w) for w in range(num_threads)]:
                f.result()
    return _summary(ap, inp, valid, first, max_rank, [ranks[a] for a, _ in bounds] if return_ranks else None,
                    nrel if return_ranks else None)


# ------------------------------------------------------------------------------------------- streaming
class _Stream:
    """Exact positions without the matrix: a query's true match has position = the number of non-junk gallery
    items whose (distance, index) key is smaller, counted block by block. Pass 1 reads the keys of each query's
    same-identity items from the tiles that hold them; pass 2 streams every block once and counts, for each
    query, how many keys fall below each of those (a sort of the block's rows and a search, or, where few keys
    can count, a search of each key and a histogram); the pair counts for the ROC come out of the same pass.
    Query row blocks run on ``num_threads`` threads, each holding one block of ``chunk_size / num_threads``."""

    def __init__(self, src: Any, groups: _Groups, chunk_size: int | None, roc: bool,
                 num_threads: int | None = None) -> None:
        self.src, self.gr = src, groups
        if num_threads is None:
            num_threads = min(torch.get_num_threads(), os.cpu_count() or 1)
        self.threads = max(1, int(num_threads))
        self.rows, self.cols = _block_shape(src.nq, src.ng, chunk_size, self.threads)
        self.junk = np.zeros(src.ng, bool)
        self.junk[groups.junk] = True
        self.roc = roc
        self.neg_hist = np.zeros(1 << 16, np.int64)  # pairs by the top 16 bits of their sortable distance

    def _key_block(self, a: int, b: int, c0: int, c1: int) -> np.ndarray:
        return _block_keys(self.src, a, b, c0, c1, self.junk)

    def same_identity_keys(self, a: int, b: int, cols: np.ndarray, inmask: np.ndarray) -> np.ndarray:
        """Pass 1: the keys of ``cols`` (padding: the largest key), read from the blocks that hold them."""
        mk = np.full(cols.shape, _KEY_PAD, np.int64)
        block_of = cols // self.cols
        for t in np.unique(block_of[inmask]):
            c0 = int(t) * self.cols
            keys = self._key_block(a, b, c0, min(c0 + self.cols, self.src.ng))
            ri, sj = np.nonzero(inmask & (block_of == t))
            mk[ri, sj] = keys[ri, cols[ri, sj] - c0]
        return mk

    def count_below(self, a: int, b: int, mk: np.ndarray, neg_hist: np.ndarray) -> np.ndarray:
        """Pass 2: for each (query, slot) the number of non-junk gallery keys below ``mk``; ROC histogram."""
        n, width = mk.shape
        srt = np.argsort(mk, axis=1)
        sk = np.take_along_axis(mk, srt, axis=1)
        sk_t = torch.from_numpy(sk)
        # only keys below a query's last real key can count for one of its real slots
        real = sk != _KEY_PAD
        top = np.where(real.any(1), np.where(real, sk, np.iinfo(np.int64).min).max(1), np.iinfo(np.int64).min)
        bins = width + 1
        hist = np.zeros(n * bins, np.int64)  # keys by how many of the query's sorted keys lie at or below them
        below_sorted = np.zeros((n, width), np.int64)
        for c0 in range(0, self.src.ng, self.cols):
            keys = self._key_block(a, b, c0, min(c0 + self.cols, self.src.ng))
            if self.roc:
                hi = (keys[:, ~self.junk[c0 : c0 + keys.shape[1]]] >> 48) + (1 << 15)
                neg_hist += np.bincount(hi.ravel(), minlength=1 << 16)
            below = keys < top[:, None]
            if np.count_nonzero(below) * max(width, 8) <= keys.size:  # few: search each in its query's sorted keys
                ri, ci = np.nonzero(below)
                slot = torch.searchsorted(sk_t[torch.from_numpy(ri)], torch.from_numpy(keys[ri, ci])[:, None],
                                          right=True)[:, 0].numpy()
                hist += np.bincount(ri * bins + slot, minlength=n * bins)
            else:  # many: sort the block's rows (vectorised sort) and search the query's keys in them
                keys.sort(axis=1)
                below_sorted += torch.searchsorted(torch.from_numpy(keys), sk_t).numpy()
        below_sorted += np.cumsum(hist.reshape(n, bins), axis=1)[:, :width]
        pos = np.empty_like(below_sorted)
        np.put_along_axis(pos, srt, below_sorted, axis=1)
        return pos

    def row_block(self, a: int) -> tuple[Any, ...]:
        """Scores of the queries ``a .. a + rows``, their matches' keys and their share of the ROC histogram."""
        b = min(a + self.rows, self.src.nq)
        cols, inmask, is_match, is_inval = self.gr.same_identity(a, b)
        mk = self.same_identity_keys(a, b, cols, inmask)
        neg_hist = np.zeros(1 << 16, np.int64) if self.roc else self.neg_hist
        if is_match.any() or self.roc:
            pos = self.count_below(a, b, mk, neg_hist)
        else:
            pos = np.zeros(cols.shape, np.int64)
        scores = _scores(pos, inmask, is_match, is_inval, self.src.ng)
        return scores, mk[is_match], mk[inmask], neg_hist

    def run(self, max_rank: int, return_ranks: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        nq = self.src.nq
        starts = range(0, nq, self.rows)
        if self.threads > 1 and len(starts) > 1:  # numpy's sorts and torch's kernels release the GIL
            with ThreadPoolExecutor(min(self.threads, len(starts))) as pool:
                blocks = list(pool.map(self.row_block, starts))
        else:
            blocks = [self.row_block(a) for a in starts]
        scores = [blk[0] for blk in blocks]
        cat = lambda i, dtype: np.concatenate([sc[i] for sc in scores]) if scores else np.zeros(0, dtype)  # noqa: E731
        ap, inp, valid, first, nrel = cat(0, float), cat(1, float), cat(2, bool), cat(3, np.int64), cat(5, np.int64)
        if self.roc:
            self.neg_hist = sum((blk[3] for blk in blocks), np.zeros(1 << 16, np.int64))
        res = _summary(ap, inp, valid, first, max_rank, [sc[4] for sc in scores] if return_ranks else None,
                       nrel if return_ranks else None)
        state = {"pos_keys": np.concatenate([blk[1] for blk in blocks] or [np.zeros(0, np.int64)]),
                 "same_keys": np.concatenate([blk[2] for blk in blocks] or [np.zeros(0, np.int64)])}
        return res, state


# ------------------------------------------------------------------------------------- same person or not
ROC_FPRS = (1e-2, 1e-3, 1e-4)


def fpr_tag(fpr: float) -> str:
    """``1e-2`` for 0.01: how an FPR is written in the result's keys."""
    return f"{fpr:.0e}".replace("e-0", "e-")


def _roc(stream: _Stream, state: dict[str, Any], fprs: tuple[float, ...]) -> dict[str, Any]:
    """TPR at each FPR of ``fprs`` over all query x gallery pairs (positives: same identity under another camera;
    negatives: another identity; same identity and camera, and junk, left out) and the distance threshold
    reaching it ("same person" when the distance is <= threshold), exact: the (k+1)-th smallest negative
    distance, k = floor(FPR x negatives), is found from the 16-bit histogram of pass 2 and a second histogram of
    the low 16 bits of the pairs in its bin (one more pass); the positives' distances are known exactly."""
    same_hi = (state["same_keys"] >> 48) + (1 << 15)
    neg_hist = stream.neg_hist - np.bincount(same_hi, minlength=1 << 16)
    n_neg = int(neg_hist.sum())
    pos_sort = np.sort((state["pos_keys"] >> 32).astype(np.int32))  # sortable distances of the positives
    n_pos = len(pos_sort)
    cum = np.cumsum(neg_hist)
    out: dict[str, Any] = {"num_positive_pairs": n_pos, "num_negative_pairs": n_neg}
    # the curve at the 16-bit bin edges (exact counts at those thresholds), for the picture
    edges = np.flatnonzero(neg_hist)
    edge_top = ((edges - (1 << 15)) << 16) + 0xFFFF  # the largest sortable value of each bin
    out["curve_fpr"] = cum[edges] / max(n_neg, 1)
    out["curve_tpr"] = np.searchsorted(pos_sort, edge_top, side="right") / max(n_pos, 1)
    if n_neg == 0 or n_pos == 0:
        return out
    targets = {f: int(np.floor(f * n_neg)) for f in fprs}  # 0-based index of the first negative not allowed
    bin_of = {f: int(np.searchsorted(cum, k, side="right")) for f, k in targets.items()}
    low = {bn: np.zeros(1 << 16, np.int64) for bn in set(bin_of.values())}
    src = stream.src
    for a in range(0, src.nq, stream.rows):
        b = min(a + stream.rows, src.nq)
        for c0 in range(0, src.ng, stream.cols):
            keys = stream._key_block(a, b, c0, min(c0 + stream.cols, src.ng))
            keys = keys[:, ~stream.junk[c0 : c0 + keys.shape[1]]]
            hi = (keys >> 48) + (1 << 15)
            for bn, h in low.items():
                h += np.bincount(((keys[hi == bn] >> 32) & 0xFFFF), minlength=1 << 16)
    same = state["same_keys"]
    for bn, h in low.items():
        sel = same[same_hi == bn]
        h -= np.bincount((sel >> 32) & 0xFFFF, minlength=1 << 16)
    for f, k in targets.items():
        bn = bin_of[f]
        before = int(cum[bn - 1]) if bn else 0
        lo = int(np.searchsorted(np.cumsum(low[bn]), k - before, side="right"))
        v = np.int32(((bn - (1 << 15)) << 16) | lo)  # sortable value of the (k+1)-th negative
        threshold = float(np.nextafter(_unsortable(np.array([v]))[0], np.float32(-np.inf)))
        tag = fpr_tag(f)
        out[f"tpr_at_fpr_{tag}"] = float(np.searchsorted(pos_sort, v, side="left") / n_pos)
        out[f"fpr_at_fpr_{tag}"] = (before + int(low[bn][:lo].sum())) / n_neg
        out[f"threshold_at_fpr_{tag}"] = threshold
    return out


def reid_scores(res: dict[str, Any]) -> dict[str, Any]:
    """The Re-ID numbers as dcal writes them everywhere (``metrics.jsonl``, ``dcal eval --json``, ``dcal search``'s
    ``metrics.json``, the console): ``mAP``, ``rank1``, ``rank5``, ``rank10``, ``mINP`` in percent and
    ``num_skipped_queries``, from the result of :func:`evaluate_reid` or :func:`eval_reid_features` (whose
    fractions stay fractions, as torchreid's); with an ROC, ``tpr_at_fpr_1e-2`` (%) and ``threshold_at_fpr_1e-2``
    (a distance) for each FPR of ``ROC_FPRS``."""
    cmc = np.asarray(res["cmc"])
    ranks = {f"rank{k}": float(res.get(f"rank{k}", cmc[min(k, len(cmc)) - 1])) for k in (1, 5, 10)}
    out = {"mAP": res["mAP"], **ranks, "mINP": res["mINP"]}
    scores = {**{k: 100.0 * float(v) for k, v in out.items()}, "num_skipped_queries": int(res["num_skipped_queries"])}
    for f in ROC_FPRS if "roc" in res else ():  # same person or not: TPR (%) and the distance threshold
        tag = fpr_tag(f)
        if f"tpr_at_fpr_{tag}" in res["roc"]:
            scores[f"tpr_at_fpr_{tag}"] = 100.0 * res["roc"][f"tpr_at_fpr_{tag}"]
            scores[f"threshold_at_fpr_{tag}"] = res["roc"][f"threshold_at_fpr_{tag}"]
    return scores


# --------------------------------------------------------------------------------------------- search
def _block_keys(src: Any, a: int, b: int, c0: int, c1: int, junk: np.ndarray | None) -> np.ndarray:
    """int64 (distance, gallery index) keys of a block; ``junk`` columns (a bool mask over the gallery) set to the
    largest key."""
    d = src.block((a, b), (c0, c1))
    np.add(d, 0.0, out=d)  # -0.0 -> +0.0: equal values get equal keys
    if np.isnan(d).any():
        raise ValueError(f"the distances hold NaN (query rows {a}..{b - 1}, gallery {c0}..{c1 - 1})")
    keys = np.empty(d.shape, np.int64)
    _fill_keys(d, keys, np.empty(d.shape, np.int32), np.arange(c0, c1, dtype=np.int64))
    if junk is not None and junk[c0:c1].any():
        keys[:, junk[c0:c1]] = _KEY_PAD
    return keys


def _groups_or_none(src: Any, ids: tuple[Any, Any, Any, Any] | None) -> _Groups | None:
    return None if ids is None else _check_ids(src.nq, src.ng, *ids)


def nearest_gallery(src: Any, k: int, ids: tuple[Any, Any, Any, Any] | None = None,
                    chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery items of every query of a distance source (:func:`distance_source`), ties by
    gallery index, streamed block by block (top-k per block, merged): ``order`` (Q, k) int64 (-1 past the end
    of a short ranking) and ``distance`` (Q, k) float32 (inf there). With ``ids`` = (q_pids, g_pids, q_camids,
    g_camids) the protocol's exclusions apply (same identity and camera; junk pid -1)."""
    groups = _groups_or_none(src, ids)
    rows, cols = _block_shape(src.nq, src.ng, chunk_size)
    k = max(1, min(int(k), src.ng))
    junk = None
    if groups is not None:
        junk = np.zeros(src.ng, bool)
        junk[groups.junk] = True
    best_all = np.empty((src.nq, k), np.int64)
    for a in range(0, src.nq, rows):
        b = min(a + rows, src.nq)
        best = np.full((b - a, 0), _KEY_PAD, np.int64)
        if groups is not None:
            same, _, _, removed = groups.same_identity(a, b)
        for c0 in range(0, src.ng, cols):
            c1 = min(c0 + cols, src.ng)
            keys = _block_keys(src, a, b, c0, c1, junk)
            if groups is not None:
                ri, sj = np.nonzero(removed & (same >= c0) & (same < c1))
                keys[ri, same[ri, sj] - c0] = _KEY_PAD
            if keys.shape[1] > k:
                keys = np.partition(keys, k - 1, axis=1)[:, :k]
            best = np.concatenate([best, keys], axis=1)
            if best.shape[1] > k:
                best = np.partition(best, k - 1, axis=1)[:, :k]
        best.sort(axis=1)
        best_all[a:b] = best
    pad = best_all == _KEY_PAD
    order = np.where(pad, -1, best_all & 0xFFFFFFFF)
    dist = np.where(pad, np.float32(np.inf), _unsortable((best_all >> 32).astype(np.int32)))
    return order, dist.astype(np.float32)


# ------------------------------------------------------------------------------------- convenience
RERANK_METHODS = ("graph", "dense")


class MatrixDistances:
    """A distance source over a matrix already in memory (the dense re-ranking's output)."""

    def __init__(self, distmat: np.ndarray) -> None:
        self.d = distmat
        self.nq, self.ng = distmat.shape

    def block(self, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        return np.array(self.d[rows[0] : rows[1], cols[0] : cols[1]], dtype=np.float32, copy=True)


def dense_rerank_bytes(nq: int, ng: int) -> int:
    """Memory of :func:`re_ranking` on dense matrices: Q x G, Q x Q, G x G distances, the Jaccard block, the
    result and their temporaries (float32)."""
    return 4 * (nq * nq + ng * ng + 4 * nq * ng)


def distance_source(q_feats: Any, g_feats: Any, metric: str = "euclidean", normalize: bool = True,
                    rerank: bool = False, rerank_method: str = "graph", rerank_kwargs: dict[str, Any] | None = None,
                    chunk_size: int | None = None) -> Any:
    """What the streaming evaluator and :func:`nearest_gallery` read: the plain distances of two feature sets, or
    their k-reciprocal re-ranking (Zhong et al.) through the sparse neighbour graph (``"graph"``: never an
    N x N matrix) or the dense matrices (``"dense"``, the reference; refused in one line when it would not fit
    in the available memory)."""
    src = FeatureDistances(q_feats, g_feats, metric, normalize)
    src.check_finite()
    if not rerank:
        return src
    if rerank_method not in RERANK_METHODS:
        raise ValueError(f"unknown re-ranking method {rerank_method!r}; expected one of {RERANK_METHODS}")
    from dcal.metrics.rerank import RerankedDistances, re_ranking

    if rerank_method == "graph":
        return RerankedDistances(src, chunk_size=chunk_size, **(rerank_kwargs or {}))
    need, have = dense_rerank_bytes(src.nq, src.ng), available_memory()
    if need > have:
        raise MemoryError(
            f"dense re-ranking of {src.nq} queries x {src.ng} gallery items needs about {need / 2**30:.1f} GiB, "
            f"{have / 2**30:.1f} GiB are available: use the neighbour graph (eval.rerank_method=graph, "
            "dcal search --rerank graph), the same distances without any N x N matrix")
    qg = compute_distance(q_feats, g_feats, metric, normalize)
    qq = compute_distance(q_feats, q_feats, metric, normalize)
    gg = compute_distance(g_feats, g_feats, metric, normalize)
    return MatrixDistances(re_ranking(qg, qq, gg, **(rerank_kwargs or {})))


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
    rerank_method: str = "graph",
    chunk_size: int | None = None,
    roc: bool = False,
    return_ranks: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Re-ID evaluation of features, exactly :func:`evaluate_reid` of :func:`compute_distance`'s matrix (or of
    :func:`re_ranking`'s, with ``rerank``; k1=20, k2=6, lambda=0.3 unless ``rerank_kwargs`` says otherwise), but
    streamed: the gallery is read in blocks of about ``chunk_size`` distances (default: from the available
    memory, :func:`default_chunk_size`) and the matrix is never held.

    ``roc``: also ``res["roc"]``, the TPR at FPR 1e-2, 1e-3, 1e-4 over all query x gallery pairs and the distance
    threshold of each (:func:`_roc`), with the curve for the picture. ``return_ranks``, ``num_threads``: as in
    :func:`evaluate_reid` (threads over query row blocks; the results do not depend on them).

    Returns ``evaluate_reid``'s dict plus ``rank1``, ``rank5``, ``rank10`` (floats; rank-k beyond the gallery
    size is the last CMC value) and ``reranked``.
    """
    src = distance_source(q_feats, g_feats, metric, normalize, rerank, rerank_method, rerank_kwargs, chunk_size)
    res = evaluate_distances(src, q_pids, g_pids, q_camids, g_camids, max_rank, chunk_size, roc, return_ranks,
                             num_threads)
    res["reranked"] = bool(rerank)
    return res


def evaluate_distances(src: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, max_rank: int = 50,
                       chunk_size: int | None = None, roc: bool = False, return_ranks: bool = False,
                       num_threads: int | None = None) -> dict[str, Any]:
    """The streaming evaluation of :func:`eval_reid_features` on a distance source already built
    (:func:`distance_source`: ``dcal search`` evaluates and ranks with one re-ranking graph)."""
    groups = _check_ids(src.nq, src.ng, q_pids, g_pids, q_camids, g_camids)
    rank_len = _max_rank(groups, max(max_rank, 10), quiet=True)
    stream = _Stream(src, groups, chunk_size, roc, num_threads)
    res, state = stream.run(rank_len, return_ranks)
    if roc:
        res["roc"] = _roc(stream, state, ROC_FPRS)
    cmc = res["cmc"]
    for k in (1, 5, 10):
        res[f"rank{k}"] = float(cmc[min(k, len(cmc)) - 1])
    res["cmc"] = cmc[:max_rank]
    return res
