"""Where the vectors of a gallery index live, behind one small interface (:class:`VectorBackend`).

Both backends hold L2-normalised float32 vectors under int64 labels (the ``id`` column of the index's id map) and
answer a k-nearest search with squared Euclidean distances, ascending; a search shorter than ``k`` pads with label
-1. What the interface leaves to the caller (:mod:`dcal.gallery.index`): the id map, the filters, the order of
ties, the manifest and the atomic commit.

* :class:`FaissBackend` – a faiss index in one file of the index folder, any ``index_factory`` string. Labels are
  faiss ids: IVF indexes take them natively, the others sit in an ``IDMap2``. Removal is what faiss allows (Flat,
  IVF, SQ, PQ: yes; HNSW and refined indexes: no, refused in one line).
* :class:`MilvusBackend` – a Milvus collection through ``pymilvus``: a Milvus server (``http://host:19530``) for
  galleries larger than one machine, or milvus-lite (a ``.db`` file: the same client API, embedded). Vectors are
  upserted under their labels, so an ``add`` retried after a kill writes the same rows again rather than twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SEARCH_EXTRA = "search"  # pip install 'dcal[search]'
MILVUS_EXTRA = "milvus"
FAISS_FILE_HEADERS_MIN = 4  # every faiss index file starts with a four-character code naming its index type


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError(f"the gallery index needs faiss: pip install 'dcal[{SEARCH_EXTRA}]' (faiss-cpu)") from None
    return faiss


def import_pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise ImportError(f"the Milvus backend needs pymilvus: pip install 'dcal[{MILVUS_EXTRA}]' (pymilvus, and "
                          "milvus-lite for a local .db file)") from None
    return pymilvus


class BackendError(ValueError):
    """A backend refused an operation or could not read its data (one line, the file or value named)."""


class VectorBackend(Protocol):
    name: str
    max_k: int  # the most neighbours one search may ask for

    @property
    def ntotal(self) -> int: ...

    def needs_training(self) -> int:
        """How many vectors training wants (0: none)."""

    def train(self, x: np.ndarray) -> None: ...

    def add(self, x: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------------------------ faiss
def ivf_lists(n: int) -> int:
    """IVF list count for ``n`` vectors: about 4 sqrt(n), kept where faiss trains well (39 to 256 training points
    per centroid: faiss warns below 39, and samples 256 per centroid at most)."""
    lo, hi = -(-n // 256), max(1, n // 39)
    return int(min(max(round(4 * np.sqrt(max(n, 1))), lo), hi))


def _pq_subquantizers(dim: int) -> int:
    """PQ sub-vectors of about 8 dimensions each (a divisor of ``dim``): dim / 8 bytes per vector."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


def factory_string(kind: str, n: int, dim: int) -> str:
    """The faiss ``index_factory`` string of a named index type for ``n`` vectors of ``dim`` (any other string is
    taken as a factory string as it is)."""
    from dcal.vocabulary import INDEX_KINDS

    if kind not in INDEX_KINDS:
        return kind
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_VECTORS else "ivf"
    k = ivf_lists(n)
    return {"flat": "Flat", "ivf": f"IVF{k},Flat", "ivf-sq8": f"IVF{k},SQ8,Refine(Flat)",
            "ivf-pq": f"IVF{k},PQ{_pq_subquantizers(dim)}x8,Refine(Flat)", "hnsw": "HNSW32"}[kind]


FLAT_MAX_VECTORS = 2_000_000  # auto: exact Flat search up to here (about 20 ms per query and 1 GB per 384-d 700k)


class FaissBackend:
    """A faiss index (module doc). ``search_params``: nprobe (IVF), efSearch (HNSW), k_factor_rf (refine)."""

    name = "faiss"
    max_k = 1 << 62

    def __init__(self, index: Any, spec: str, search_params: dict[str, int] | None = None) -> None:
        self.faiss = import_faiss()
        self.index, self.spec = index, spec
        self.search_params = dict(search_params or {})
        self._apply_params()

    @classmethod
    def create(cls, spec: str, dim: int) -> FaissBackend:
        faiss = import_faiss()
        try:
            index = faiss.index_factory(dim, spec, faiss.METRIC_L2)
        except RuntimeError as e:
            raise BackendError(f"--type {spec!r}: not an index faiss can build "
                               f"({_faiss_message(e)})") from None
        if not isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2)):
            index = faiss.IndexIDMap2(index)  # labels of our own (Flat, HNSW, refine ...)
        return cls(index, spec, default_search_params(index))

    def _apply_params(self) -> None:
        ps = self.faiss.ParameterSpace()
        faiss = self.faiss
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else self.index
        for key, value in self.search_params.items():
            try:
                ps.set_index_parameter(inner, key, value)
            except RuntimeError:
                raise BackendError(f"{key}={value}: index {self.spec!r} has no such search parameter") from None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def needs_training(self) -> int:
        if self.index.is_trained:
            return 0
        ivf = self.faiss.try_extract_index_ivf(self.index)
        lists = int(ivf.nlist) if ivf is not None else 1
        # faiss samples 256 points per centroid at most; codebooks (PQ, SQ) train well on 64k
        return int(min(max(256 * lists, 65536), max(39 * lists, 262144)))

    def train(self, x: np.ndarray) -> None:
        self._call(self.index.train, x)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        self._call(self.index.add_with_ids, x, ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> int:
        try:
            return int(self.index.remove_ids(self.faiss.IDSelectorBatch(ids.astype(np.int64))))
        except RuntimeError:
            raise BackendError(f"index type {self.spec!r} cannot remove vectors (faiss has no removal for it: "
                               "HNSW graphs and refined indexes); build a new index from the items to keep") from None

    def tuning_ladder(self) -> tuple[str, list[int]] | None:
        """The search parameter that trades speed for recall and the values a calibration tries, ascending
        (IVF: nprobe 1, 2, 4 ... up to every list; HNSW: efSearch 16 ... 512); None where search is exact."""
        ivf = self.faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            lists = int(ivf.nlist)
            return "nprobe", sorted({min(lists, 1 << i) for i in range(lists.bit_length() + 1)})
        if "efSearch" in self.search_params:
            return "efSearch", [16, 32, 64, 128, 256, 512]
        return None

    def set_search_param(self, key: str, value: int) -> None:
        self.search_params[key] = int(value)
        self._apply_params()

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d, labels = self._call(self.index.search, np.ascontiguousarray(x, dtype=np.float32), int(k))
        return d, labels

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as e:
            raise BackendError(f"faiss ({self.spec}): {_faiss_message(e)}") from None

    def write(self, path: Path) -> None:
        self.faiss.write_index(self.index, str(path))

    @classmethod
    def read(cls, path: Path, spec: str, search_params: dict[str, int], size: int, header: str) -> FaissBackend:
        """Read the index file after checking what the manifest says of it (size, four-character header): a
        truncated or foreign file is refused before faiss parses it."""
        faiss = import_faiss()
        actual = path.stat().st_size
        if actual != size:
            raise BackendError(f"{path}: {actual} bytes where the manifest says {size} (a truncated or replaced "
                               "index file)")
        with open(path, "rb") as f:
            found = f.read(FAISS_FILE_HEADERS_MIN).decode("latin-1")
        if found != header:
            raise BackendError(f"{path}: starts with {found!r}, not the faiss header {header!r} the manifest names "
                               "(not this index's file)")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise BackendError(f"{path}: faiss cannot read it ({_faiss_message(e)})") from None
        return cls(index, spec, search_params)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "index": self.spec, "search": self.search_params,
                "faiss_version": self.faiss.__version__}


def default_search_params(index: Any) -> dict[str, int]:
    """nprobe = lists / 16 (IVF; at least 1), efSearch 128 (HNSW), k_factor_rf 4 (refine): where the build starts;
    ``build_index`` then calibrates nprobe / efSearch on the gallery itself (:func:`dcal.gallery.index.calibrate`),
    and ``dcal index search --nprobe`` changes them per search."""
    import faiss

    out: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        out["nprobe"] = max(1, int(ivf.nlist) // 16)
    text = type(faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)).__name__
    if "HNSW" in text:
        out["efSearch"] = 128
    if "Refine" in text:
        out["k_factor_rf"] = 4
    return out


def _faiss_message(e: RuntimeError) -> str:
    """faiss' C++ exception text without its file/line preamble: the last non-empty line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def file_header(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return f.read(FAISS_FILE_HEADERS_MIN).decode("latin-1")


# ----------------------------------------------------------------------------------------------------- milvus
class MilvusBackend:
    """A Milvus collection (``uri``: a server address or a milvus-lite ``.db`` path) with fields ``id`` (int64
    primary key) and ``vector``; a FLAT index and the L2 metric, so that its searches are exact."""

    name = "milvus"
    max_k = 16384  # Milvus' largest topk

    def __init__(self, uri: str, collection: str, dim: int) -> None:
        import_pymilvus()
        from pymilvus import MilvusClient

        self.uri, self.collection, self.dim = uri, collection, dim
        try:
            self.client = MilvusClient(uri)
        except Exception as e:  # noqa: BLE001 - pymilvus raises its own types (MilvusException, ConnectionError)
            raise BackendError(f"Milvus at {uri}: cannot connect ({type(e).__name__}: {e})") from None

    @classmethod
    def create(cls, uri: str, collection: str, dim: int) -> MilvusBackend:
        from pymilvus import DataType

        self = cls(uri, collection, dim)
        if self.client.has_collection(collection):
            raise BackendError(f"Milvus at {uri}: collection {collection!r} exists already (another index's?); "
                               "name another with --collection")
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        self.client.create_collection(collection, schema=schema, index_params=params)
        return self

    @classmethod
    def open(cls, uri: str, collection: str, dim: int) -> MilvusBackend:
        self = cls(uri, collection, dim)
        if not self.client.has_collection(collection):
            raise BackendError(f"Milvus at {uri}: no collection {collection!r} (the index's vectors are gone)")
        return self

    @property
    def ntotal(self) -> int:
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def needs_training(self) -> int:
        return 0

    def train(self, x: np.ndarray) -> None:
        return None

    def add(self, x: np.ndarray, ids: np.ndarray, batch: int = 4096) -> None:
        for a in range(0, len(ids), batch):  # pymilvus takes rows as dicts: one request per batch
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[a:a + batch].tolist(), x[a:a + batch].tolist(),
                                                                 strict=True)]
            self.client.upsert(self.collection, rows)
        self.client.flush(self.collection)

    def remove(self, ids: np.ndarray) -> int:
        res = self.client.delete(self.collection, ids=[int(i) for i in ids])
        self.client.flush(self.collection)
        return int(res.get("delete_count", len(ids))) if isinstance(res, dict) else len(ids)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(min(k, self.max_k))
        d = np.full((len(x), k), np.inf, dtype=np.float32)
        labels = np.full((len(x), k), -1, dtype=np.int64)
        if len(x) == 0:
            return d, labels
        res = self.client.search(self.collection, data=np.asarray(x, dtype=np.float32).tolist(), limit=k,
                                 anns_field="vector", search_params={"metric_type": "L2"})
        for q, hits in enumerate(res):  # the client's result is per query, a list of hits
            n = len(hits)
            if n:
                labels[q, :n] = [h["id"] for h in hits]
                d[q, :n] = [h["distance"] for h in hits]
        return d, labels

    def close(self) -> None:
        self.client.close()

    def describe(self) -> dict[str, Any]:
        from pymilvus import __version__

        return {"backend": self.name, "uri": self.uri, "collection": self.collection, "index": "FLAT",
                "pymilvus_version": __version__}
