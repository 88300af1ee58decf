"""Distances between two feature sets, computed the one way dcal computes them (Re-ID evaluation, search,
re-ranking): in canonical tiles, so the dense matrix and every streamed block are equal to the bit, and the
(distance, gallery index) sort keys that order by distance then index exactly. Memory: a block, never the whole
query x gallery matrix unless asked for (:func:`compute_distance`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DISTANCE_METRICS = ("euclidean", "sqeuclidean", "cosine")
_KEY_PAD = np.iinfo(np.int64).max
_FLOAT32_EXACT_INT = 1 << 24


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------- distance
# Every distance dcal computes comes from one canonical tile: query rows [i*TILE_ROWS, (i+1)*TILE_ROWS) x gallery
# rows [j*TILE_COLS, (j+1)*TILE_COLS). BLAS results depend on the shape of the call (MKL rounds a 7-column
# product differently from the same columns inside a 4096-column one), so the dense matrix and the streamed blocks
# are equal to the bit only because both are assembled from the same tiles, computed by the same calls.
TILE_ROWS = 256
TILE_COLS = 4096


def _features(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{what} must be (N, D), got shape {tuple(t.shape)}")
    return t


def _prepare(x: torch.Tensor, metric: str, normalize: bool, device: torch.device) -> torch.Tensor:
    x = x.to(device).float()
    return F.normalize(x, dim=1) if normalize or metric == "cosine" else x


def distance_tile(q: torch.Tensor, g: torch.Tensor, metric: str) -> torch.Tensor:
    """float32 distances of prepared (rows, D) x (cols, D) features: the formula, in one place (the dense matrix,
    the streaming evaluator and the gallery index's calibration all call it)."""
    if metric == "cosine":
        d = torch.mm(q, g.t())
        return d.neg_().add_(1.0)
    d = torch.addmm((g * g).sum(1).unsqueeze(0).expand(len(q), -1), q, g.t(), beta=1.0, alpha=-2.0)
    d.add_((q * q).sum(1).unsqueeze(1)).clamp_(min=0.0)
    return d.sqrt_() if metric == "euclidean" else d


class FeatureDistances:
    """The query x gallery distances of two feature sets, computed on demand in canonical tiles (``block``): the
    source both the dense matrix (:func:`compute_distance`) and the streaming evaluator read."""

    def __init__(self, query_features: Any, gallery_features: Any, metric: str = "euclidean",
                 normalize: bool = True) -> None:
        if metric not in DISTANCE_METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {DISTANCE_METRICS}")
        self.q = _features(query_features, "query features")
        self.g = _features(gallery_features, "gallery features")
        if self.q.shape[1] != self.g.shape[1]:
            raise ValueError(f"features must be (Q, D) and (G, D), got {tuple(self.q.shape)} and "
                             f"{tuple(self.g.shape)}")
        self.metric, self.normalize = metric, normalize
        self.device = self.q.device
        self.nq, self.ng = len(self.q), len(self.g)

    def check_finite(self) -> None:
        """One line naming the first non-finite feature row (it would make every distance of its row NaN)."""
        for what, x in (("query", self.q), ("gallery", self.g)):
            for a in range(0, len(x), 65536):
                bad = ~torch.isfinite(x[a : a + 65536].float()).all(1)
                if bad.any():
                    raise ValueError(f"{what} features hold NaN or inf (row {a + int(bad.nonzero()[0])})")

    def block(self, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """float32 distances of query rows ``rows`` x gallery items ``cols`` (both ``(start, stop)``, starting on
        a tile boundary and ending on one or at the end)."""
        (r0, r1), (c0, c1) = rows, cols
        if r0 % TILE_ROWS or c0 % TILE_COLS or (r1 % TILE_ROWS and r1 != self.nq) or \
                (c1 % TILE_COLS and c1 != self.ng):
            raise ValueError(f"block {rows} x {cols} does not follow the {TILE_ROWS} x {TILE_COLS} tiles")
        out = np.empty((r1 - r0, c1 - c0), np.float32) if out is None else out
        for c in range(c0, c1, TILE_COLS):
            e = min(c + TILE_COLS, c1)
            g = _prepare(self.g[c:e], self.metric, self.normalize, self.device)
            for a in range(r0, r1, TILE_ROWS):
                b = min(a + TILE_ROWS, r1)
                q = _prepare(self.q[a:b], self.metric, self.normalize, self.device)
                out[a - r0 : b - r0, c - c0 : e - c0] = distance_tile(q, g, self.metric).cpu().numpy()
        return out


def compute_distance(
    query_features: torch.Tensor | np.ndarray,
    gallery_features: torch.Tensor | np.ndarray,
    metric: str = "euclidean",
    normalize: bool = True,
    as_numpy: bool = True,
) -> np.ndarray | torch.Tensor:
    """Query x gallery distance matrix, float32, on the CPU.

    Args:
        query_features, gallery_features: ``(Q, D)`` and ``(G, D)`` features (any device and float dtype; computed
            there in float32, tile by tile (``TILE_ROWS`` x ``TILE_COLS``), and gathered on the CPU).
        metric: ``"euclidean"`` (default) ``||q - g||``; ``"sqeuclidean"`` ``||q - g||^2`` (what torchreid's
            and TransReID's ``euclidean`` return; same ranking); ``"cosine"`` ``1 - cos(q, g)``.
        normalize: L2-normalise the features first (the default, the project's re-id distance). Ignored by
            ``"cosine"``, which is scale-free.
        as_numpy: return a numpy array (default) or a CPU torch tensor (sharing memory).
    """
    src = FeatureDistances(query_features, gallery_features, metric, normalize)
    out = src.block((0, src.nq), (0, src.ng))
    return out if as_numpy else torch.from_numpy(out)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else free pages; else 4 GiB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


BYTES_PER_DISTANCE = 40  # the streaming evaluator's working memory per distance of a block (float, keys, counts)


def default_chunk_size() -> int:
    """Distances per streamed block: a quarter of the available memory, at most 1 GiB of working memory, at least
    one tile."""
    budget = min(available_memory() // 4, 1 << 30)
    return max(TILE_ROWS * TILE_COLS, budget // BYTES_PER_DISTANCE)


def _block_shape(nq: int, ng: int, chunk_size: int | None, parts: int = 1) -> tuple[int, int]:
    """(query rows, gallery columns) of a streamed block: whole tiles, about ``chunk_size / parts`` distances, at
    most ``nq / parts`` rows (rounded up to a tile), so that ``parts`` threads can each hold one block."""
    size = default_chunk_size() if chunk_size is None else max(1, int(chunk_size))
    size = max(1, size // max(1, parts))
    up = lambda n, t: max(t, -(-n // t) * t)  # noqa: E731
    rows = min(up(-(-nq // max(1, parts)), TILE_ROWS), max(TILE_ROWS, size // TILE_COLS // TILE_ROWS * TILE_ROWS))
    cols = min(up(ng, TILE_COLS), max(TILE_COLS, size // rows // TILE_COLS * TILE_COLS))
    return rows, cols


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


def _sortable(values32: np.ndarray) -> np.ndarray:
    """int32 image of float32 values (no ``-0.0``, no NaN) with the same order."""
    bits = values32.view(np.int32)
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def _unsortable(ints: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_sortable`."""
    ints = np.asarray(ints, np.int32)
    return np.where(ints < 0, ints ^ np.int32(0x7FFFFFFF), ints).view(np.float32)


def _keys(values32: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(distance, gallery index) keys of single values, as :func:`_fill_keys` makes them for a block."""
    return (_sortable(values32).astype(np.int64) << 32) | cols


