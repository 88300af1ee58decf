"""Gallery index benchmark (issue 26, index cases): each index type of ``dcal index`` on generated clustered
vectors, through dcal's own API (``dcal.gallery.index.build_index`` / ``GalleryIndex.search``).

Per (size, dimension, index type): build time (the nprobe / efSearch calibration included), file size, load time,
resident memory added by loading, queries/s at each thread count (top-100 of every query), recall@1/10/100 against
Flat for two query sets: ``gallery-like`` (held-out vectors of the gallery's own clusters: queries of identities
the gallery holds) and ``unlike`` (vectors of other clusters: nothing in the gallery is near them); with
``--sweep``, queries/s and recall@10 at every nprobe / efSearch; and, computed from each type's storage per vector
(not measured), the memory 10M and 100M vectors would need.

    python benchmarks/bench_index.py                       # 100k and 1M x 384 and 768 (hours of CPU, GBs of disk)
    python benchmarks/bench_index.py --sizes 2000 --dims 32 --queries 50 --json out.json   # a smoke run
    python benchmarks/bench_index.py --sizes 1000000 --dims 384 --types ivf --sweep      # the nprobe trade-off

Run it on an otherwise idle machine: the timings are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dcal.gallery.backends import _pq_subquantizers, factory_string, ivf_lists  # noqa: E402

TYPES = ("flat", "ivf", "ivf-sq8", "ivf-pq", "hnsw")
META = {"checkpoint_sha256": "bench", "fusion": "sa+glca", "after_bn": False, "flip": False}


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, spread: float = 0.35) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (identities seen from many cameras, roughly)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):  # bounded memory while generating
        b = min(a + 100_000, n)
        out[a:b] = centres[rng.integers(0, clusters, b - a)] + spread * rng.standard_normal((b - a, dim))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bytes_per_vector(kind: str, n: int, dim: int) -> float:
    """Memory per vector of a type (codes + labels + the exact copy of a refine + graph links), plus the coarse
    quantizer spread over ``n``: the formula behind the 10M / 100M columns."""
    labels = 16  # int64 label in the index (IDMap2 keeps a reverse map too) ...
    idmap = 32 + 40  # ... and dcal's id map: id, pid, camid, frame, offset + ~40 bytes of path
    lists = ivf_lists(n)
    per = {"flat": 4 * dim, "ivf": 4 * dim, "ivf-sq8": dim + 4 * dim, "ivf-pq": _pq_subquantizers(dim) + 4 * dim,
           "hnsw": 4 * dim + 32 * 2 * 4}[kind]
    quantizer = 4 * dim * lists / n if kind.startswith("ivf") else 0.0
    return per + labels + idmap + quantizer


QUERY_KINDS = ("gallery-like", "unlike")  # held-out vectors of the gallery's clusters; vectors of other clusters


def recall(rows: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = (exact[:, :k, None] == rows[:, None, :k]).any(2).sum(1)  # labels are unique within a row
    return round(float(hits.mean()) / k, 4)


def run_case(n: int, dim: int, kind: str, base: np.ndarray, queries: dict[str, np.ndarray],
             exact: dict[str, np.ndarray] | None, threads: list[int], work: Path, sweep: bool
             ) -> tuple[dict, dict[str, np.ndarray]]:
    import torch

    from dcal.gallery import index as gi
    from dcal.retrieval import FeatureSet

    paths = [f"g/{i:09d}.jpg" for i in range(n)]
    fs = FeatureSet(torch.from_numpy(base), paths, None, None, {**META, "dim": dim})
    folder = work / f"{kind}-{n}-{dim}"
    t = time.perf_counter()
    index = gi.build_index(folder, [gi.FeatureSource("bench", n, fs.meta, lambda: iter([fs]))], kind)
    build = time.perf_counter() - t
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    del index
    before = rss_bytes()
    t = time.perf_counter()
    index = gi.GalleryIndex.open(folder)
    load = time.perf_counter() - t
    memory = rss_bytes() - before
    qps, rows = {}, {}
    for th in threads:
        gi.set_threads(th)
        t = time.perf_counter()
        rows[QUERY_KINDS[0]] = index.search(queries[QUERY_KINDS[0]], 100).rows
        qps[th] = round(len(queries[QUERY_KINDS[0]]) / (time.perf_counter() - t), 1)
    for q in QUERY_KINDS[1:]:
        rows[q] = index.search(queries[q], 100).rows
    record = {"n": n, "dim": dim, "type": kind, "index": index.manifest["index"], "search": index.manifest["search"],
              "calibration": index.manifest.get("calibration"), "build_s": round(build, 2), "file_bytes": size,
              "load_s": round(load, 3), "rss_added_bytes": memory, "queries_per_s": qps}
    if exact is not None:
        for q in QUERY_KINDS:
            record[q] = {f"recall@{k}": recall(rows[q], exact[q], k) for k in (1, 10, 100)}
        ladder = index.backend.tuning_ladder() if sweep else None
        if ladder is not None:  # the speed / recall trade-off around the calibrated default, at the most threads
            key, values = ladder
            points = []
            for v in values[: values.index(256) + 1] if 256 in values else values:
                idx = gi.GalleryIndex.open(folder, search_params={key: v})
                t = time.perf_counter()
                got = {QUERY_KINDS[0]: idx.search(queries[QUERY_KINDS[0]], 10).rows}
                rate = round(len(queries[QUERY_KINDS[0]]) / (time.perf_counter() - t), 1)
                got.update({q: idx.search(queries[q], 10).rows for q in QUERY_KINDS[1:]})
                points.append({key: v, "queries_per_s": rate,
                               **{f"recall@10 {q}": recall(got[q], exact[q], 10) for q in QUERY_KINDS}})
            record["sweep"] = points
    shutil.rmtree(folder)
    return record, rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dims", default="384,768")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--sweep", action="store_true", help="also queries/s and recall@10 at each nprobe (IVF, up to "
                   "256) or efSearch (HNSW), with the most threads")
    p.add_argument("--work", default=None, help="where the indexes are written (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    types = [t for t in args.types.split(",") if t]
    threads = [int(t) for t in args.threads.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_index_"))
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for n in sizes:
        for dim in dims:
            both = clustered(n + args.queries, dim, seed=0)
            base = both[:n]
            queries = {"gallery-like": both[n:], "unlike": clustered(args.queries, dim, seed=1)}
            exact = None
            for kind in ["flat", *[t for t in types if t != "flat"]]:
                record, rows = run_case(n, dim, kind, base, queries, exact, threads, work, args.sweep)
                if kind == "flat":
                    exact = rows  # the reference: recall 1 by definition
                    record.update({q: {f"recall@{k}": 1.0 for k in (1, 10, 100)} for q in QUERY_KINDS})
                    if "flat" not in types:
                        continue
                records.append(record)
                print(json.dumps(record), flush=True)
    computed = {t: {"index": factory_string(t, 10**7, d), "dim": d,
                    "10M_GB": round(bytes_per_vector(t, 10**7, d) * 1e7 / 1e9, 1),
                    "100M_GB": round(bytes_per_vector(t, 10**8, d) * 1e8 / 1e9, 1)} for t in types for d in dims}
    out = {"records": records, "computed_memory (not measured)": computed}
    print(json.dumps({"computed_memory (not measured)": computed}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
