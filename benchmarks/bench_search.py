"""Search and evaluation at scale, case by case (``--cases``).

    python benchmarks/bench_search.py --cases eval [--dims 768 128] [--distractors 0 100000 500000] [--json out.json]
    python benchmarks/bench_search.py --cases index --dims 128 --distractors 500000 --noise 1.4 [--index-types ivf]

``eval``: exact Re-ID evaluation, dense (``compute_distance`` + ``evaluate_reid``: the Q x G matrix, sorted)
against streaming (``eval_reid_features``: the gallery in blocks, the matrix never held), on a Market-1501-sized
problem (3,368 queries, 15,913 gallery images: 750 identities, 6 cameras) plus generated distractor features
(another identity each), for each feature dimension. Every measurement runs in a fresh ``spawn`` process: its
time, and its peak resident memory beyond the features (the kernel's high-water mark, reset once the features
exist; ``ru_maxrss`` minus the resident size before, where the reset is not available). The script checks
that both evaluators give the same numbers and exits 1 when they do not.

``index``: what an approximate gallery index loses on the same problem. Each ``--index-types`` index is built over
the gallery with ``dcal.gallery.index.build_index`` (its default search parameter calibrated at build) and
searched for every query's top 100 with the protocol's exclusions (``GalleryIndex.search``); from those lists,
rank-1, rank-10 and mAP@100 (the AP of the top 100: matches beyond it count as missed, divided by all of the
query's true matches); the loss is the difference to ``flat`` (exact). Time: build and the 3,368 searches.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# spawned workers import this file by its name: keep its folder on the path they inherit (tests load it by path)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

MARKET = {"num_query": 3368, "num_gallery": 15913, "num_ids": 750, "num_cams": 6}
NOISE = 2.6  # per-dimension noise around unit-variance identity centres: mAP neither trivial nor chance


def make_problem(dim: int, distractors: int, num_query: int, num_gallery: int, seed: int = 0,
                 noise: float = NOISE) -> dict[str, Any]:
    """Features, pids and camids: identity centres plus noise, then ``distractors`` random features of pid 0."""
    import torch

    rng = np.random.default_rng(seed)
    ids = np.arange(1, MARKET["num_ids"] + 1)
    g_pids = np.concatenate([rng.choice(ids, num_gallery), np.zeros(distractors, np.int64)])
    q_pids = rng.choice(ids, num_query)
    g_cams, q_cams = rng.integers(0, MARKET["num_cams"], len(g_pids)), rng.integers(0, MARKET["num_cams"], num_query)
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(ids) + 1, dim, generator=gen)
    qf = centres[torch.from_numpy(q_pids)] + noise * torch.randn(num_query, dim, generator=gen)
    gf = torch.empty(len(g_pids), dim)
    for a in range(0, len(g_pids), 65536):  # in pieces: no temporary of the gallery's size
        b = min(a + 65536, len(g_pids))
        z = torch.randn(b - a, dim, generator=gen)
        gf[a:b] = torch.where(torch.from_numpy(g_pids[a:b] == 0)[:, None], z * (1 + noise**2) ** 0.5,
                              centres[torch.from_numpy(g_pids[a:b])] + noise * z)
    return {"qf": qf, "gf": gf, "q_pids": q_pids, "g_pids": g_pids, "q_cams": q_cams, "g_cams": g_cams}


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _eval_case(params: dict[str, Any], queue: mp.Queue) -> None:
    import torch

    from dcal.metrics import compute_distance, eval_reid_features, evaluate_reid

    torch.set_num_threads(params["threads"]) if params["threads"] else None
    p = make_problem(params["dim"], params["distractors"], params["num_query"], params["num_gallery"],
                     noise=params["noise"])
    ids = (p["q_pids"], p["g_pids"], p["q_cams"], p["g_cams"])
    before = _rss_bytes("VmRSS") or 0
    reset = _reset_peak()
    t0 = time.perf_counter()
    if params["evaluator"] == "dense":
        res = evaluate_reid(compute_distance(p["qf"], p["gf"]), *ids, max_rank=50)
    else:
        res = eval_reid_features(p["qf"], p["gf"], *ids, max_rank=50, chunk_size=params["chunk_size"])
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    queue.put({"seconds": seconds, "peak_beyond_features_gb": max(peak - before, 0) / 2**30,
               "mAP": res["mAP"], "mINP": res["mINP"], "cmc": [float(c) for c in res["cmc"]],
               "num_valid_queries": res["num_valid_queries"]})


def _spawn(target: Callable[[dict[str, Any], mp.Queue], None], params: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(params, queue))
    proc.start()
    while True:  # a worker that dies (memory, import error) must not leave us waiting forever
        try:
            out = queue.get(timeout=2)
            break
        except Exception:  # queue.Empty
            if not proc.is_alive():
                raise RuntimeError(f"the benchmark worker died (exit code {proc.exitcode})") from None
    proc.join()
    return out


def run_eval(args: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    rows, same = [], True
    for dim in args.dims:
        for distractors in args.distractors:
            base = {"dim": dim, "distractors": distractors, "num_query": args.num_query,
                    "num_gallery": args.num_gallery, "chunk_size": args.chunk_size, "threads": args.threads,
                    "noise": args.noise}
            got = {ev: _spawn(_eval_case, {**base, "evaluator": ev}) for ev in ("dense", "streaming")}
            equal = all(abs(got["dense"][k] - got["streaming"][k]) <= 1e-12 for k in ("mAP", "mINP")) and \
                got["dense"]["cmc"] == got["streaming"]["cmc"]
            same &= equal
            for ev, r in got.items():
                rows.append({"case": "eval", "dim": dim, "gallery": args.num_gallery + distractors,
                             "evaluator": ev, **r, "equal": equal})
    return rows, same


def _market_name(pid: int, cam: int, i: int) -> str:
    return f"{pid:04d}_c{cam + 1}s1_000000_{i:08d}.jpg"  # Market-1501's name: pid, camera (1-based), frame


def top100_scores(rows: np.ndarray, p: dict[str, Any]) -> dict[str, float]:
    """rank-1, rank-10 and mAP@100 of top-100 lists (``-1``: nothing) under the protocol's exclusions (the search
    applied them): each query's AP over its top 100, divided by all its true matches in the gallery."""
    g_pids, g_cams, q_pids, q_cams = p["g_pids"], p["g_cams"], p["q_pids"], p["q_cams"]
    hit = (rows >= 0) & (g_pids[np.maximum(rows, 0)] == q_pids[:, None])
    total = ((g_pids[None] == q_pids[:, None]) & (g_cams[None] != q_cams[:, None])).sum(1)
    valid = total > 0
    prec = np.cumsum(hit, 1) / np.arange(1, rows.shape[1] + 1)
    ap = (prec * hit).sum(1) / np.maximum(total, 1)
    return {"rank1": float(hit[valid, 0].mean()), "rank10": float(hit[valid, :10].any(1).mean()),
            "mAP@100": float(ap[valid].mean())}


def _index_case(params: dict[str, Any], queue: mp.Queue) -> None:
    import shutil
    import tempfile

    import torch

    from dcal.gallery import index as gi
    from dcal.retrieval import FeatureSet

    torch.set_num_threads(params["threads"]) if params["threads"] else None
    p = make_problem(params["dim"], params["distractors"], params["num_query"], params["num_gallery"],
                     noise=params["noise"])
    names = [_market_name(int(pid), int(c), i) for i, (pid, c) in enumerate(zip(p["g_pids"], p["g_cams"], strict=True))]
    meta = {"checkpoint_sha256": "bench", "fusion": "sa+glca", "after_bn": False, "flip": False, "dim": params["dim"]}
    fs = FeatureSet(p["gf"], names, None, None, meta)
    work = Path(tempfile.mkdtemp(prefix="bench_search_index_"))
    try:
        t0 = time.perf_counter()
        index = gi.build_index(work / "i", [gi.FeatureSource("gallery", len(names), meta, lambda: iter([fs]))],
                               params["index_type"])
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = index.search(p["qf"].numpy(), 100, query_pids=p["q_pids"], query_camids=p["q_cams"])
        search = time.perf_counter() - t0
        queue.put({"index": index.manifest["index"], "search": index.manifest["search"], "build_s": build,
                   "search_s": search, **top100_scores(res.rows, p)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_index(args: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    rows = []
    for dim in args.dims:
        for distractors in args.distractors:
            base = {"dim": dim, "distractors": distractors, "num_query": args.num_query,
                    "num_gallery": args.num_gallery, "threads": args.threads, "noise": args.noise}
            got = {t: _spawn(_index_case, {**base, "index_type": t}) for t in ["flat", *args.index_types]}
            for t, r in got.items():
                lost = {f"{k} lost": got["flat"][k] - r[k] for k in ("rank1", "rank10", "mAP@100")}
                rows.append({"case": "index", "dim": dim, "gallery": args.num_gallery + distractors, "type": t, **r,
                             **lost})
    return rows, True


CASES: dict[str, Callable[[argparse.Namespace], tuple[list[dict[str, Any]], bool]]] = {"eval": run_eval,
                                                                                      "index": run_index}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | dim | gallery | evaluator | time (s) | peak beyond features (GB) | mAP | equal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    index_rows = [r for r in rows if r["case"] == "index"]
    if index_rows:
        lines = ["| dim | gallery | index (search) | build (s) | search (s) | rank-1 | rank-10 | mAP@100 | "
                 "mAP@100 lost |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in index_rows:
            lines.append(f"| {r['dim']} | {r['gallery']:,} | {r['index']} {r['search'] or ''} | {r['build_s']:.1f} | "
                         f"{r['search_s']:.1f} | {100 * r['rank1']:.2f} | {100 * r['rank10']:.2f} | "
                         f"{100 * r['mAP@100']:.2f} | {100 * r['mAP@100 lost']:.2f} |")
        lines += ["", "| case | dim | gallery | evaluator | time (s) | peak beyond features (GB) | mAP | equal |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in [r for r in rows if r["case"] == "eval"]:
        lines.append(f"| {r['case']} | {r['dim']} | {r['gallery']:,} | {r['evaluator']} | "
                     f"{r['seconds']:.1f} | {r['peak_beyond_features_gb']:.2f} | {100 * r['mAP']:.2f} | "
                     f"{'yes' if r['equal'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["eval"])
    ap.add_argument("--dims", nargs="+", type=int, default=[768, 128])
    ap.add_argument("--distractors", nargs="+", type=int, default=[0, 100_000, 500_000],
                    help="generated distractor features added to the gallery")
    ap.add_argument("--num-query", type=int, default=MARKET["num_query"])
    ap.add_argument("--num-gallery", type=int, default=MARKET["num_gallery"])
    ap.add_argument("--chunk-size", type=int, default=None, help="streaming block (default: from free memory)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--noise", type=float, default=NOISE,
                    help=f"per-dimension noise around the identity centres (default {NOISE}: mAP a few %%; 1.4: "
                    "about 57%% with 100k distractors at 128-d, like a trained model's)")
    ap.add_argument("--index-types", nargs="+", default=["ivf"], help="index cases: the types compared with flat")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    rows, ok = [], True
    for case in args.cases:
        got, same = CASES[case](args)
        rows += got
        ok &= same
    print(f"{platform.processor() or platform.machine()}, {args.num_query} queries; python {sys.version.split()[0]}")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    if not ok:
        print("the dense and streaming evaluators disagree", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
