"""A gallery index on disk: build once, add and remove images later, search with the re-id protocol's exclusions.

An index folder holds

* ``manifest.json`` – what the index is: format and dcal version, the backend and its index string and search
  parameters (faiss version), the features it accepts (model file digest, fusion, BNNeck side, flip, dimension),
  the metric and normalisation, the number of vectors, the names, sizes and headers of its data files, and a token
  that ties the id map to this manifest;
* ``index-<generation>.faiss`` – the faiss index (faiss backend), or nothing here (Milvus: the vectors live in the
  Milvus collection the manifest names);
* ``ids-<generation>.npz`` – the id map as plain arrays (``np.load(..., allow_pickle=False)``): the label of each
  vector (ascending), pid, camid and frame from the file name (:data:`NO_ID` where the name carries none) and the
  path (UTF-8 bytes with offsets, so 100M names do not need 100M Python strings);
* ``.dcal.lock`` while a process writes it (:class:`dcal.run_folder.RunLock`): a second writer is refused.

Every write is a new generation: its files are written into a temporary folder inside the index folder, fsynced,
moved in under new names, and ``manifest.json`` is replaced atomically last (the commit); the previous
generation's files are deleted after. A write killed at any point leaves the previous manifest naming the previous
files: the index is as it was; the next write removes what the killed one left. A reader checks the manifest
before any file: a newer format, a data file of another size or header, an id map of another length or token,
a dimension mismatch are one-line :class:`IndexError_` errors, and faiss reads only a file that passed them.

Search (:meth:`GalleryIndex.search`) is exact with ``Flat``: the backend is asked for more neighbours than ``k``
until, for every query, ``k`` items survive the filters (the query's identity under the query's camera and junk
pid -1 left out, as in evaluation, and the user's cameras / frame window) and the ``k``-th of them is strictly
nearer than the farthest item fetched, so no item the backend left out could rank before it or tie with it; then
ties are ordered by the item's position in the index (the order it was added), as ``dcal search`` orders them
by gallery index. When that needs the whole gallery the search is exhaustive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcal.gallery.backends import BackendError, FaissBackend, MilvusBackend, factory_string, file_header

INDEX_FORMAT = "dcal-gallery-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NO_ID = np.iinfo(np.int64).min  # pid / camid / frame of a name that carries none (pid -1 is junk, a real value)
FEATURE_KEYS = ("checkpoint_sha256", "fusion", "after_bn", "flip", "dim")  # as dcal.retrieval.check_compatible
_GENERATION_FILE = re.compile(r"(index|ids)-\d{6}\.(faiss|npz)")
_TMP_PREFIX = ".tmp-"
# query rows x fetched neighbours held at once by a search (distances + labels + masks: ~100 MB)
SEARCH_BUDGET = 1 << 22
# the default nprobe / efSearch of an approximate index: the smallest whose recall@10 against exact search reaches
# CALIBRATION_RECALL on CALIBRATION_QUERIES vectors of the gallery itself (leave-one-out), measured at build
CALIBRATION_QUERIES = 1000
CALIBRATION_RECALL = 0.99


class IndexError_(ValueError):  # noqa: N801 - IndexError is Python's own
    """An index folder that cannot be read or written as asked (one line naming the file and what was expected)."""


# ------------------------------------------------------------------------------------------------ id map
@dataclass
class IdMap:
    """Per vector, in label order: ``ids`` (the backend's labels, ascending), ``pids``, ``camids``, ``frames``
    (int64, :data:`NO_ID` when unknown) and paths as ``path_bytes`` cut at ``path_offsets`` (len + 1)."""

    ids: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    frames: np.ndarray
    path_offsets: np.ndarray
    path_bytes: np.ndarray

    @classmethod
    def empty(cls) -> IdMap:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))

    @classmethod
    def from_paths(cls, paths: Sequence[str], ids: np.ndarray, pids: Sequence[int] | None,
                   camids: Sequence[int] | None) -> IdMap:
        from dcal.retrieval import parse_frame

        encoded = [os.fsencode(p) for p in paths]
        offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        frames = [parse_frame(p) for p in paths]
        return cls(np.asarray(ids, dtype=np.int64),
                   np.asarray(pids if pids is not None else [NO_ID] * len(paths), dtype=np.int64),
                   np.asarray(camids if camids is not None else [NO_ID] * len(paths), dtype=np.int64),
                   np.asarray([NO_ID if f is None else f for f in frames], dtype=np.int64),
                   offsets, np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, row: int) -> str:
        a, b = self.path_offsets[row], self.path_offsets[row + 1]
        return os.fsdecode(self.path_bytes[a:b].tobytes())

    def paths(self, rows: Iterable[int] | None = None) -> list[str]:
        return [self.path(int(r)) for r in (range(len(self)) if rows is None else rows)]

    def concat(self, other: IdMap) -> IdMap:
        return IdMap(*(np.concatenate([a, b]) for a, b in zip(self._columns(), other._columns(), strict=True)),
                     np.concatenate([self.path_offsets, other.path_offsets[1:] + self.path_offsets[-1]]),
                     np.concatenate([self.path_bytes, other.path_bytes]))

    def keep(self, mask: np.ndarray) -> IdMap:
        """The rows where ``mask`` is True (paths repacked)."""
        lengths = np.diff(self.path_offsets)[mask]
        starts = self.path_offsets[:-1][mask]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        # the byte positions of the kept paths, without a loop over rows
        pos = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return IdMap(*(c[mask] for c in self._columns()), offsets, self.path_bytes[pos])

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """Row of each label (-1 for -1 and for labels the map does not hold)."""
        rows = np.searchsorted(self.ids, labels)
        rows = np.minimum(rows, max(len(self.ids) - 1, 0))
        ok = (labels >= 0) & (len(self.ids) > 0)
        if len(self.ids):
            ok &= self.ids[rows] == labels
        return np.where(ok, rows, -1)

    def _columns(self) -> tuple[np.ndarray, ...]:
        return self.ids, self.pids, self.camids, self.frames

    def arrays(self) -> dict[str, np.ndarray]:
        return {"id": self.ids, "pid": self.pids, "camid": self.camids, "frame": self.frames,
                "path_offsets": self.path_offsets, "path_bytes": self.path_bytes}


_IDMAP_DTYPES = {"id": "<i8", "pid": "<i8", "camid": "<i8", "frame": "<i8", "path_offsets": "<i8",
                 "path_bytes": "|u1", "token": "|u1"}


def write_idmap(path: Path, idmap: IdMap, token: str) -> None:
    with open(path, "wb") as f:
        np.savez(f, **idmap.arrays(), token=np.frombuffer(token.encode("ascii"), dtype=np.uint8))
        f.flush()
        os.fsync(f.fileno())


def read_idmap(path: Path, count: int, token: str) -> IdMap:
    """The id map of an index of ``count`` vectors: every array's header (dtype, shape) is checked before it is
    read, so a foreign or altered file is one line, never a pickle and never an allocation its header asks for."""
    size = path.stat().st_size
    want = {k: (count,) for k in ("id", "pid", "camid", "frame")}
    want["path_offsets"] = (count + 1,)
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
            if names != set(_IDMAP_DTYPES):
                raise IndexError_(f"{path}: an id map holds {sorted(_IDMAP_DTYPES)}, this file {sorted(names)}")
            for key, dtype in _IDMAP_DTYPES.items():
                with z.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, descr = read_header(f)
                    if np.dtype(descr).str != dtype or len(shape) != 1 or shape[0] * np.dtype(descr).itemsize > size:
                        raise IndexError_(f"{path}: array {key!r} is {descr} {shape}, expected {dtype} of at most "
                                          f"the file's size")
                    if key in want and shape != want[key]:
                        raise IndexError_(f"{path}: array {key!r} has {shape[0]} rows, the manifest's index "
                                          f"{want[key][0]} (an id map of another index or length)")
                arrays[key] = np.load(z.open(f"{key}.npy"), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, IndexError_):
            raise
        raise IndexError_(f"{path}: not a readable id map ({type(e).__name__}: {e})") from None
    if arrays["token"].tobytes().decode("ascii", "replace") != token:
        raise IndexError_(f"{path}: written with another manifest (token differs): not this index's id map")
    idmap = IdMap(arrays["id"], arrays["pid"], arrays["camid"], arrays["frame"], arrays["path_offsets"],
                  arrays["path_bytes"])
    off = idmap.path_offsets
    if len(off) and (off[0] != 0 or off[-1] != len(idmap.path_bytes) or (np.diff(off) < 0).any()):
        raise IndexError_(f"{path}: path offsets do not cut its path bytes")
    if (np.diff(idmap.ids) <= 0).any():
        raise IndexError_(f"{path}: labels are not strictly ascending")
    return idmap


# --------------------------------------------------------------------------------------------- sources
@dataclass
class FeatureSource:
    """Features to index: ``count`` vectors computed as ``meta`` says, read by ``chunks()`` as
    :class:`dcal.retrieval.FeatureSet` pieces (a shard set one shard at a time)."""

    name: str
    count: int
    meta: dict[str, Any]
    chunks: Callable[[], Iterator[Any]]
    failed: dict[str, str] = field(default_factory=dict)  # images of a folder that could not be read


def open_source(source: str | Path, loaded: Any = None, skip_paths: set[str] | None = None,
                **embed_options: Any) -> FeatureSource:
    """A features file (``dcal embed --output F.safetensors``), a shard set (``--output FOLDER``) or an image
    folder embedded by ``loaded`` (:func:`dcal.retrieval.features_of`); ``skip_paths``: images of an image folder
    not to embed (those already in the index)."""
    from dcal.gallery.shards import ShardSet, is_shard_set
    from dcal.retrieval import (
        FeatureSet,
        embed_files,
        embedding_meta,
        embedding_options,
        features_of,
        identities,
        is_features_file,
    )

    if is_shard_set(source):
        shards = ShardSet.open(source)
        _check_model(shards.meta, loaded, source)
        return FeatureSource(str(source), len(shards), shards.meta, shards.chunks)
    if is_features_file(source) or loaded is None or not skip_paths:
        feats = features_of(source, loaded, "source", **embed_options)
        return FeatureSource(str(source), len(feats), feats.meta, lambda: iter([feats]), feats.failed)
    from dcal.inference import list_images

    workers = embed_options.pop("workers", 0)
    files = [f for f in list_images([source]) if str(f) not in skip_paths]
    options = embedding_options(loaded, **embed_options)
    meta = embedding_meta(loaded, options, None)
    if not files:  # nothing new: an empty source that still names its model, for the compatibility check
        return FeatureSource(str(source), 0, meta, lambda: iter([]))
    feats, kept, failed = embed_files(loaded, files, options, workers)
    if feats is None:
        raise ValueError(f"none of the {len(files)} new images of {source} could be read")
    pids, camids = identities(kept)
    fs = FeatureSet(feats, kept, pids, camids, {**meta, "dim": int(feats.shape[1])}, failed)
    return FeatureSource(str(source), len(fs), fs.meta, lambda: iter([fs]), failed)


def _check_model(meta: dict[str, Any], loaded: Any, source: Any) -> None:
    if loaded is None:
        return
    from dcal.retrieval import file_digest

    if meta.get("checkpoint_sha256") != file_digest(loaded.checkpoint):
        raise ValueError(f"{source}: features were computed by {meta.get('checkpoint')}, not by {loaded.checkpoint}")


def normalized(x: Any) -> np.ndarray:
    """float32 rows of unit L2 norm (zero rows stay zero), as ``dcal.metrics.compute_distance`` normalises."""
    x = np.asarray(x.float().numpy() if hasattr(x, "numpy") else x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -------------------------------------------------------------------------------------------------- index
@dataclass
class SearchResult:
    """``rows`` (Q, k): id-map rows of each query's top-k (-1 past a short list), ``distance`` (Q, k) in the
    search's metric (inf past the end)."""

    rows: np.ndarray
    distance: np.ndarray
    metric: str = "euclidean"
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class GalleryIndex:
    """An opened index folder (module doc): ``manifest``, ``idmap`` and the ``backend`` holding the vectors."""

    folder: Path
    manifest: dict[str, Any]
    idmap: IdMap
    backend: Any

    def __len__(self) -> int:
        return len(self.idmap)

    @property
    def dim(self) -> int:
        return int(self.manifest["features"]["dim"])

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def open(cls, folder: str | Path, search_params: dict[str, int] | None = None) -> GalleryIndex:
        folder = Path(folder)
        manifest = read_manifest(folder)
        count, dim = manifest["count"], manifest["features"]["dim"]
        files = manifest["files"]
        idmap = read_idmap(_existing(folder, files["ids"]["name"]), count, manifest["token"])
        backend = _open_backend(folder, manifest, search_params)
        if isinstance(backend, FaissBackend) and backend.ntotal != count:  # Milvus may hold an unfinished add's rows
            raise IndexError_(f"{folder}: the {manifest['backend']} index holds {backend.ntotal} vectors, the manifest "
                              f"{count} (files of different writes)")
        if getattr(backend, "dim", dim) != dim:
            raise IndexError_(f"{folder}: the index file has dimension {backend.dim}, the manifest {dim}")
        return cls(folder, manifest, idmap, backend)

    # -------------------------------------------------------------------------------------------- search
    def search(self, queries: Any, k: int = 10, *, query_pids: Sequence[int] | None = None,
               query_camids: Sequence[int] | None = None, protocol: bool = True,
               cameras: Sequence[int] | None = None, frames: tuple[int, int] | None = None,
               metric: str = "euclidean") -> SearchResult:
        """The ``k`` nearest items of each query (module doc), with the protocol's exclusions when the query ids
        are given and ``protocol``, and only the items of ``cameras`` (0-based camids) / ``frames`` (inclusive
        window) when given (items whose names carry no camera / frame are then left out)."""
        from dcal.vocabulary import RETRIEVAL_METRICS

        if metric not in RETRIEVAL_METRICS:
            raise ValueError(f"metric {metric!r}: expected one of {RETRIEVAL_METRICS}")
        q = normalized(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexError_(f"queries of dimension {q.shape[-1]}, index {self.folder} of {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        m = self.idmap
        allowed = np.ones(len(m), dtype=bool)
        if cameras is not None:
            allowed &= np.isin(m.camids, np.asarray(list(cameras), dtype=np.int64))
        if frames is not None:
            allowed &= (m.frames != NO_ID) & (m.frames >= frames[0]) & (m.frames <= frames[1])
        use_ids = protocol and query_pids is not None and query_camids is not None
        qp = np.asarray(query_pids if use_ids else [], dtype=np.int64)
        qc = np.asarray(query_camids if use_ids else [], dtype=np.int64)
        everything = bool(allowed.all())

        def keep(rows: np.ndarray, which: np.ndarray) -> np.ndarray:
            ok = rows >= 0
            r = np.where(ok, rows, 0)
            if not everything:
                ok &= allowed[r]
            if use_ids:
                p, c = m.pids[r], m.camids[r]
                ok &= ~((p == qp[which, None]) & (c == qc[which, None])) & (p != -1)
            return ok

        rows, d2, stats = filtered_topk(self._search_labels, len(m), q, k, keep, self.backend.max_k,
                                        first=k + 1 if everything and not use_ids else 2 * k + 8)
        dist = np.sqrt(np.maximum(d2, 0)) if metric == "euclidean" else d2 / 2  # |a-b|^2 = 2 - 2cos on unit rows
        return SearchResult(rows, np.where(rows >= 0, dist, np.inf).astype(np.float32), metric, stats)

    def _search_labels(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d, labels = self.backend.search(q, k)
        # padding at inf; a label the id map lacks (a Milvus row of a killed add) is fetched but never kept
        return np.where(labels >= 0, d, np.inf), self.idmap.rows_of(labels)

    def info(self) -> dict[str, Any]:
        out = {"folder": str(self.folder), "vectors": len(self), **self.backend.describe(),
               "dim": self.dim, "metric": self.manifest["metric"], "normalization": self.manifest["normalization"],
               "model": self.manifest["features"].get("checkpoint"),
               "model_sha256": self.manifest["features"].get("checkpoint_sha256"),
               "fusion": self.manifest["features"].get("fusion"), "after_bn": self.manifest["features"].get("after_bn"),
               "flip": self.manifest["features"].get("flip"), "with_ids": int((self.idmap.pids != NO_ID).sum()),
               "dcal_version": self.manifest["dcal_version"], "format_version": self.manifest["format_version"]}
        cal = self.manifest.get("calibration")
        if isinstance(cal, dict):  # what the default search parameter was chosen from, at build
            out["calibrated"] = (f"{cal.get('param')} {cal.get('value')}: recall@{cal.get('at_k')} {cal.get('recall')} "
                                 f"on {cal.get('queries')} {cal.get('queries_from', 'gallery vectors')} (target "
                                 f"{cal.get('target')})")
        ivf = _ivf_lists(self.backend)
        if ivf:
            out["ivf_lists"] = ivf
            out["vectors_per_list"] = round(len(self) / ivf, 1)
        return out


def filtered_topk(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], total: int, q: np.ndarray,
                  k: int, keep: Callable[[np.ndarray, np.ndarray], np.ndarray], max_k: int,
                  first: int | None = None, budget: int = SEARCH_BUDGET) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact filtered top-k over a nearest-neighbour ``search(q, n) -> (squared distances, rows)`` (ascending;
    distance inf past the end, row -1 there and for items that can never be kept) of ``total`` items.

    Per query, fetch ``n`` neighbours (``first``, then 4x as many for the queries not settled) until ``k`` rows
    pass ``keep(rows, query_numbers)`` and the k-th of them is strictly nearer than the n-th fetched (or the
    search is exhausted); rows are ordered by (distance, row). Rounds and query chunks are vectorised; memory is
    ``budget`` query x neighbour cells."""
    nq = len(q)
    out_rows = np.full((nq, k), -1, dtype=np.int64)
    out_d = np.full((nq, k), np.inf, dtype=np.float32)
    todo = np.arange(nq)
    n = max(1, min(first or k, total, max_k))
    sizes = []
    while todo.size and total:
        sizes.append(n)
        unsettled = []
        chunk = max(1, budget // n)
        for a in range(0, len(todo), chunk):
            which = todo[a:a + chunk]
            d, rows = search(q[which], n)
            ok = keep(rows, which)
            dk = np.where(ok, d, np.inf)
            order = np.lexsort((np.where(ok, rows, np.iinfo(np.int64).max), dk), axis=1)[:, :k]
            top_rows = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(rows, order, 1), -1)
            top_d = np.take_along_axis(dk, order, 1)
            fetched = np.isfinite(d).sum(1)
            last = np.take_along_axis(d, np.maximum(fetched - 1, 0)[:, None], 1)[:, 0]
            kth = top_d[:, -1] if top_d.shape[1] == k else np.full(len(which), np.inf)
            exhausted = (n >= min(total, max_k)) | (fetched < n)
            settled = exhausted | ((ok.sum(1) >= k) & (kth < last))
            width = top_rows.shape[1]
            out_rows[which[settled], :width] = top_rows[settled]
            out_d[which[settled], :width] = top_d[settled]
            unsettled.append(which[~settled])
        todo = np.concatenate(unsettled)
        n = min(n * 4, total, max_k)
    return out_rows, out_d, {"fetch_sizes": sizes}  # the neighbours asked for in each round


# ------------------------------------------------------------------------------------------ manifest, files
def read_manifest(folder: Path) -> dict[str, Any]:
    from dcal.checkpoint import read_versioned_json

    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"index folder {folder} does not exist")
    if not path.is_file():
        raise IndexError_(f"{folder}: not a gallery index (no {MANIFEST}; build one with 'dcal index build')")
    manifest = read_versioned_json(path, INDEX_FORMAT, FORMAT_VERSION, "dcal gallery index manifest",
                                   "format_version", IndexError_)
    for key, kind in (("count", int), ("token", str), ("backend", str), ("features", dict), ("files", dict),
                      ("metric", str), ("normalization", str), ("next_id", int), ("generation", int)):
        if not isinstance(manifest.get(key), kind):
            raise IndexError_(f"{path}: key {key!r} missing or not a {kind.__name__}")
    if not isinstance(manifest["features"].get("dim"), int):
        raise IndexError_(f"{path}: features.dim missing")
    return manifest


def _existing(folder: Path, name: str) -> Path:
    if not isinstance(name, str) or Path(name).name != name or not _GENERATION_FILE.fullmatch(name):
        raise IndexError_(f"{folder / MANIFEST}: file name {name!r} is not one dcal writes")
    path = folder / name
    if not path.is_file():
        raise IndexError_(f"{path}: named by the manifest but missing (the folder was changed by hand?)")
    return path


def _open_backend(folder: Path, manifest: dict[str, Any], search_params: dict[str, int] | None) -> Any:
    params = {**manifest.get("search", {}), **(search_params or {})}
    if manifest["backend"] == "faiss":
        entry = manifest["files"].get("index") or {}
        path = _existing(folder, entry.get("name"))
        return FaissBackend.read(path, manifest["index"], params, entry.get("bytes"), entry.get("header"))
    if manifest["backend"] == "milvus":
        m = manifest["milvus"]
        uri = m["uri"] if "://" in m["uri"] else str(folder / m["uri"])  # a lite .db file lives in the folder
        return MilvusBackend.open(uri, m["collection"], manifest["features"]["dim"])
    raise IndexError_(f"{folder / MANIFEST}: backend {manifest['backend']!r} is not one this dcal knows")


def _ivf_lists(backend: Any) -> int:
    if not isinstance(backend, FaissBackend):
        return 0
    ivf = backend.faiss.try_extract_index_ivf(backend.index)
    return int(ivf.nlist) if ivf is not None else 0


def _lock(folder: Path) -> Any:
    from dcal.run_folder import RunLock

    return RunLock(folder, user="dcal index writer",
                   advice="wait for it to end (one process writes an index at a time)")


def _clean_leftovers(folder: Path, manifest: dict[str, Any] | None) -> None:
    """Remove what a killed write left (its temporary folders, generation files no manifest names): only names
    dcal writes."""
    named = {f.get("name") for f in (manifest or {}).get("files", {}).values()}
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(_TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and _GENERATION_FILE.fullmatch(p.name) and p.name not in named:
            p.unlink(missing_ok=True)


def _own_name(name: str) -> bool:
    """A name an index write makes (its lock, temporaries, generation files)."""
    from dcal.run_folder import LOCK

    return name == LOCK or name.startswith(_TMP_PREFIX) or bool(_GENERATION_FILE.fullmatch(name))


def _fsync_dir(folder: Path) -> None:
    from dcal.checkpoint import _fsync_dir as fsync_dir

    fsync_dir(folder)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The commit point of a write: readers see the old manifest (and files) or the new ones."""
    from dcal.checkpoint import atomic_write_text

    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def _commit(folder: Path, old: dict[str, Any] | None, manifest: dict[str, Any], idmap: IdMap,
            backend: Any) -> dict[str, Any]:
    """Write a new generation (module doc): data files into a temporary folder, fsync, move in, then the
    manifest; then delete the old generation's files."""
    from dcal import __version__

    gen = (old["generation"] + 1) if old else 1
    token = uuid.uuid4().hex
    tmp = folder / f"{_TMP_PREFIX}{token}"
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}
    if isinstance(backend, FaissBackend):
        name = f"index-{gen:06d}.faiss"
        backend.write(tmp / name)
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
        files["index"] = {"name": name, "bytes": (tmp / name).stat().st_size, "header": file_header(tmp / name)}
    name = f"ids-{gen:06d}.npz"
    write_idmap(tmp / name, idmap, token)
    files["ids"] = {"name": name, "bytes": (tmp / name).stat().st_size}
    _fsync_dir(tmp)
    for entry in files.values():
        os.replace(tmp / entry["name"], folder / entry["name"])
    _fsync_dir(folder)
    manifest = {**manifest, "format": INDEX_FORMAT, "format_version": FORMAT_VERSION, "dcal_version": __version__,
                "generation": gen, "token": token, "count": len(idmap), "files": files}
    _write_manifest(folder, manifest)
    tmp.rmdir()
    _clean_leftovers(folder, manifest)
    return manifest


# -------------------------------------------------------------------------------------------------- writing
def check_features(manifest_features: dict[str, Any], meta: dict[str, Any], source: str, folder: Path) -> None:
    for key in FEATURE_KEYS:
        if meta.get(key) != manifest_features.get(key):
            what = "dimension" if key == "dim" else "model" if key == "checkpoint_sha256" else key
            raise IndexError_(f"{source}: {what} {meta.get(key)!r} but index {folder} holds {what} "
                              f"{manifest_features.get(key)!r}: features of another model or feature kind (embed "
                              "with the index's model and settings)")


def _training_sample(sources: Sequence[FeatureSource], want: int, seed: int = 0) -> np.ndarray:
    """``want`` rows drawn uniformly from all sources (one pass, one chunk in memory at a time)."""
    import torch

    total = sum(s.count for s in sources)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(want, total), replace=False))
    parts, start = [], 0
    for s in sources:
        for chunk in s.chunks():
            n = len(chunk)
            sel = pick[(pick >= start) & (pick < start + n)] - start
            if sel.size:
                parts.append(normalized(chunk.features[torch.as_tensor(sel)]))
            start += n
    return np.concatenate(parts)


class TrueNeighbours:
    """The exact ``k`` nearest labels of some queries, kept up to date while vectors are added (``observe``): the
    reference a calibration measures an approximate index's recall against, with no second pass over the
    gallery. Squared L2 on L2-normalised vectors (the index's metric); memory: queries x 16k distances."""

    def __init__(self, queries: np.ndarray, k: int = 11, held_out: bool = False) -> None:
        import torch

        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = int(k)
        self.held_out = held_out  # the queries are not gallery vectors: no label of theirs to leave out
        self._q = torch.from_numpy(self.queries)
        self.dist = torch.empty(len(queries), 0)
        self.labels = torch.empty(len(queries), 0, dtype=torch.int64)

    def observe(self, x: np.ndarray, ids: np.ndarray) -> None:
        import torch

        from dcal.metrics.distance import distance_tile

        for a in range(0, len(x), 16384):
            g = torch.from_numpy(np.ascontiguousarray(x[a : a + 16384], dtype=np.float32))
            d = torch.cat([self.dist, distance_tile(self._q, g, "sqeuclidean")], 1)  # dcal's one formula
            new = torch.from_numpy(np.asarray(ids[a : a + 16384], np.int64)).expand(len(d), -1)
            lab = torch.cat([self.labels, new], 1)
            keep = min(self.k, d.shape[1])
            self.dist, pick = torch.topk(d, keep, dim=1, largest=False, sorted=True)
            self.labels = torch.gather(lab, 1, pick)

    @property
    def at_k(self) -> int:
        """The k of the recall measured: ``k``, less the query itself where the queries are gallery vectors."""
        return self.k if self.held_out else self.k - 1

    def recall(self, labels: np.ndarray) -> float:
        """Recall@``at_k`` of an index's top-k ``labels`` for the queries. Gallery vectors as queries are found
        first by both (themselves), so one shared label is left out: leave-one-out."""
        truth = self.labels.numpy()
        k = truth.shape[1]
        if k <= (0 if self.held_out else 1):
            return 1.0
        found = (truth[:, :, None] == labels[:, None, :k]).any(2).sum(1)  # labels are unique within a row
        if self.held_out:
            return float(found.mean() / k)
        return float(np.clip(found - 1, 0, None).mean() / (k - 1))


def calibrate(backend: Any, truth: TrueNeighbours | None, target: float = CALIBRATION_RECALL) -> dict[str, Any] | None:
    """Set the backend's speed/recall parameter (nprobe, efSearch) to the smallest value of its ladder whose
    recall@10 (``at_k``: fewer in a gallery of 11 or fewer) against ``truth`` reaches ``target`` (where none does,
    e.g. a PQ index without refine, the smallest within 0.005 of the best); returns what was measured, for the
    manifest. None where search is exact."""
    ladder = backend.tuning_ladder() if isinstance(backend, FaissBackend) else None
    if ladder is None or truth is None or len(truth.queries) == 0:
        return None
    key, values = ladder
    tried: list[tuple[int, float]] = []
    for value in values:
        backend.set_search_param(key, value)
        tried.append((value, truth.recall(backend.search(truth.queries, truth.k)[1])))
        if tried[-1][1] >= target:
            break
    best = max(r for _, r in tried)
    value, recall = next((v, r) for v, r in tried if r >= min(target, best - 0.005))
    backend.set_search_param(key, value)
    return {"param": key, "value": value, "recall": round(recall, 4), "at_k": truth.at_k, "target": target,
            "queries": len(truth.queries), "tried": {str(v): round(r, 4) for v, r in tried}}


def _add_sources(backend: Any, idmap: IdMap, sources: Sequence[FeatureSource], next_id: int,
                 skip: set[str] | None = None, observe: Callable[[np.ndarray, np.ndarray], None] | None = None
                 ) -> tuple[IdMap, int, int]:
    """Add every chunk of ``sources`` (rows whose path is in ``skip`` left out): (id map, next label, skipped).
    ``observe(vectors, labels)`` sees every added chunk (the calibration's exact neighbours)."""
    import torch

    skipped = 0
    for s in sources:
        for chunk in s.chunks():
            paths = list(chunk.paths)
            mask = np.array([p not in skip for p in paths], dtype=bool) if skip else np.ones(len(paths), dtype=bool)
            skipped += int((~mask).sum())
            if not mask.any():
                continue
            rows = np.flatnonzero(mask)
            ids = np.arange(next_id, next_id + len(rows), dtype=np.int64)
            vectors = normalized(chunk.features[torch.as_tensor(rows)])
            backend.add(vectors, ids)
            if observe is not None:
                observe(vectors, ids)
            pids = [chunk.pids[i] for i in rows] if chunk.has_ids else None
            camids = [chunk.camids[i] for i in rows] if chunk.has_ids else None
            idmap = idmap.concat(IdMap.from_paths([paths[i] for i in rows], ids, pids, camids))
            if skip is not None:
                skip.update(paths[i] for i in rows)  # a path twice in one add is added once
            next_id += len(rows)
    return idmap, next_id, skipped


def build_index(folder: str | Path, sources: Sequence[FeatureSource], kind: str = "auto", *,
                backend: str = "faiss", metric: str = "euclidean", overwrite: bool = False,
                milvus_uri: str | None = None, collection: str | None = None,
                calibration: FeatureSource | None = None) -> GalleryIndex:
    """A new index in ``folder`` from ``sources`` (all computed by one model with one setting). ``kind``: a name of
    :data:`dcal.vocabulary.INDEX_KINDS` or a faiss ``index_factory`` string; ``overwrite`` replaces an index
    already there (its files are removed after the new one is committed). An approximate index's search parameter
    is calibrated (:func:`calibrate`) on ``calibration``'s features (queries like the ones to come; by the same
    model) or, without it, on the gallery's own vectors."""
    from dcal.vocabulary import INDEX_BACKENDS, RETRIEVAL_METRICS

    folder = Path(folder)
    if not sources:
        raise ValueError("give at least one features file, shard set or image folder")
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {INDEX_BACKENDS}")
    if metric not in RETRIEVAL_METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {RETRIEVAL_METRICS}")
    features = {k: sources[0].meta.get(k) for k in (*FEATURE_KEYS, "checkpoint", "img_size")}
    for s in sources[1:]:
        check_features(features, s.meta, s.name, folder)
    total = sum(s.count for s in sources)
    if total == 0:
        raise ValueError("the sources hold no features")
    if calibration is not None and calibration.count == 0:
        raise ValueError(f"{calibration.name}: no features to calibrate the search with")
    dim = int(features["dim"])
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not an index folder")
    with _lock(folder):
        old = read_manifest(folder) if (folder / MANIFEST).exists() else None
        if old is not None and not overwrite:
            raise FileExistsError(f"{folder} holds an index already: add to it with 'dcal index add', or replace it "
                                  "with --overwrite")
        if old is None and any(not _own_name(p.name) for p in folder.iterdir()):
            raise FileExistsError(f"{folder}: the folder holds other files; build into a new or empty folder")
        _clean_leftovers(folder, old)
        truth = None
        if backend == "faiss":
            spec = factory_string(kind, total, dim)
            be: Any = FaissBackend.create(spec, dim)
            want = be.needs_training()
            if want:
                be.train(_training_sample(sources, want))
            if be.tuning_ladder() is not None and calibration is not None:
                check_features(features, calibration.meta, calibration.name, folder)
                truth = TrueNeighbours(_training_sample([calibration], CALIBRATION_QUERIES, seed=1),
                                       k=min(10, total), held_out=True)
            elif be.tuning_ladder() is not None:
                truth = TrueNeighbours(_training_sample(sources, CALIBRATION_QUERIES, seed=1), k=min(11, total))
            extra: dict[str, Any] = {"index": spec}
        else:
            if kind not in ("auto", "flat"):
                raise ValueError(f"--type {kind}: the Milvus backend builds a FLAT (exact) collection")
            uri = milvus_uri or "milvus.db"
            name = collection or f"dcal_{uuid.uuid4().hex[:12]}"
            be = MilvusBackend.create(uri if "://" in uri else str(folder / uri), name, dim)
            extra = {"index": "FLAT", "search": {}, "milvus": {"uri": uri, "collection": name}}
        idmap, next_id, _ = _add_sources(be, IdMap.empty(), sources, 0, skip=set(),
                                         observe=truth.observe if truth is not None else None)
        if backend == "faiss":
            cal = calibrate(be, truth)
            if cal and calibration is not None:
                cal["queries_from"] = f"queries of {calibration.name}"
            extra = {**extra, "search": dict(be.search_params), **({"calibration": cal} if cal else {})}
        manifest = {"backend": backend, **extra, "features": features, "metric": metric, "normalization": "l2",
                    "backend_metric": "squared L2 on L2-normalised float32", "next_id": next_id}
        manifest = _commit(folder, old, manifest, idmap, be)
    return GalleryIndex(folder, manifest, idmap, be)


def add_to_index(folder: str | Path, sources: Sequence[FeatureSource]) -> tuple[GalleryIndex, int, int]:
    """Append ``sources`` to the index in ``folder`` without touching what it holds; items whose path the index
    holds already are skipped. Returns (the index, items added, items skipped)."""
    folder = Path(folder)
    with _lock(folder):
        index = GalleryIndex.open(folder)
        for s in sources:
            if s.count:
                check_features(index.manifest["features"], s.meta, s.name, folder)
        _clean_leftovers(folder, index.manifest)
        before = len(index)
        idmap, next_id, skipped = _add_sources(index.backend, index.idmap, sources, index.manifest["next_id"],
                                               skip=set(index.idmap.paths()))
        if len(idmap) == before:
            return index, 0, skipped
        manifest = _commit(folder, index.manifest, {**index.manifest, "next_id": next_id}, idmap, index.backend)
    return GalleryIndex(folder, manifest, idmap, index.backend), len(idmap) - before, skipped


def remove_from_index(folder: str | Path, paths: Sequence[str] = (), pids: Sequence[int] = ()) -> tuple[
        GalleryIndex, int]:
    """Remove the items of ``paths`` and of identities ``pids``; refused in one line where the index type cannot
    remove (nothing is written then). Returns (the index, items removed)."""
    folder = Path(folder)
    with _lock(folder):
        index = GalleryIndex.open(folder)
        m = index.idmap
        drop = np.isin(m.pids, np.asarray(list(pids), dtype=np.int64)) if pids else np.zeros(len(m), dtype=bool)
        if paths:
            wanted = {str(p) for p in paths}
            drop |= np.array([p in wanted for p in m.paths()], dtype=bool)
        if not drop.any():
            return index, 0
        try:
            removed = index.backend.remove(m.ids[drop])
        except BackendError as e:
            raise IndexError_(f"{folder}: {e}") from None
        if removed != int(drop.sum()):
            raise IndexError_(f"{folder}: the backend removed {removed} of {int(drop.sum())} vectors; index unchanged")
        idmap = m.keep(~drop)
        manifest = _commit(folder, index.manifest, index.manifest, idmap, index.backend)
    return GalleryIndex(folder, manifest, idmap, index.backend), int(drop.sum())


def set_threads(threads: int | None) -> None:
    """faiss' OpenMP threads (``--threads``), when faiss is installed and a count is given."""
    if threads is not None:
        from dcal.gallery.backends import import_faiss

        import_faiss().omp_set_num_threads(int(threads))


def write_index_search(out_dir: str | Path, query: Any, index: GalleryIndex, result: SearchResult,
                       num_vis: int | None = 100) -> list[Path]:
    """``ranking.csv`` and the ``visrank/`` pictures of a search (:func:`dcal.retrieval.write_search`) over the
    rows the search returned (the gallery's names are read for those rows only)."""
    import torch

    from dcal.retrieval import FeatureSet, Ranking, write_search

    used, inverse = np.unique(result.rows, return_inverse=True)
    has = used >= 0
    rows = used[has]
    local = np.where(result.rows >= 0, inverse.reshape(result.rows.shape) - int((~has).sum()), -1)
    m = index.idmap
    ids = bool(len(rows)) and bool((m.pids[rows] != NO_ID).all())
    view = FeatureSet(torch.zeros(len(rows), 0), m.paths(rows), m.pids[rows].tolist() if ids else None,
                      m.camids[rows].tolist() if ids else None, dict(index.manifest["features"]))
    match = np.zeros(local.shape, dtype=bool)
    if ids and query.has_ids:
        match = (np.asarray(view.pids)[np.maximum(local, 0)] == np.asarray(query.pids)[:, None]) & (local >= 0)
    return write_search(out_dir, query, view, Ranking(local, result.distance, match), num_vis)
