"""Time ``compute_distance`` + ``evaluate_reid`` on MSMT17- and Market-1501-sized random problems.

    python benchmarks/bench_reid_eval.py [--sizes msmt17 market] [--json out.json] [--no-reference]

Each measurement runs in a fresh ``spawn`` process, so its peak resident memory (``ru_maxrss``, which includes
the interpreter, torch and the features) is its own. On the Market-sized problem a reference evaluator
that follows torchreid's ``eval_market1501`` (full ``np.argsort`` then a Python loop over queries) runs on the
same distance matrix: the script prints the speed-up and checks that the numbers agree.

Features are class centres plus noise (768-d), so that mAP is neither 0 nor 1; the pids follow each
benchmark's test split (MSMT17: 3,060 ids, 15 cameras; Market-1501: 750 ids + 2,793 distractors of pid 0,
6 cameras).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, int]] = {
    "msmt17": {"num_query": 11659, "num_gallery": 82161, "num_ids": 3060, "num_cams": 15, "distractors": 0},
    "market": {"num_query": 3368, "num_gallery": 15913, "num_ids": 750, "num_cams": 6, "distractors": 2793},
}
DIM = 768
NOISE = 2.6  # per-dimension noise around unit-variance class centres: mAP ~0.5, neither trivial nor chance


def make_problem(name: str, seed: int = 0) -> dict[str, Any]:
    """Features, pids and camids of a random problem shaped like ``name``'s test split."""
    import torch

    s = SIZES[name]
    rng = np.random.default_rng(seed)
    ng_real = s["num_gallery"] - s["distractors"]
    ids = np.arange(1, s["num_ids"] + 1)
    g_pids = np.concatenate([rng.choice(ids, ng_real), np.zeros(s["distractors"], np.int64)])
    q_pids = rng.choice(ids, s["num_query"])
    g_cams = rng.integers(0, s["num_cams"], len(g_pids))
    q_cams = rng.integers(0, s["num_cams"], len(q_pids))
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(s["num_ids"] + 1, DIM, generator=gen)
    qf = centres[torch.from_numpy(q_pids)] + NOISE * torch.randn(len(q_pids), DIM, generator=gen)
    gf = centres[torch.from_numpy(g_pids)] + NOISE * torch.randn(len(g_pids), DIM, generator=gen)
    gf[g_pids == 0] = torch.randn(int((g_pids == 0).sum()), DIM, generator=gen) * (1 + NOISE**2) ** 0.5
    return {"qf": qf, "gf": gf, "q_pids": q_pids, "g_pids": g_pids, "q_cams": q_cams, "g_cams": g_cams}


def reference_eval_market1501(
    distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray,
    max_rank: int = 50, kind: str | None = None,
) -> dict[str, Any]:
    """torchreid's ``eval_market1501`` algorithm: full argsort, then a Python loop over queries.

    ``kind=None`` is torchreid's ``np.argsort`` default (an unstable quicksort: the order of tied distances is
    implementation-defined); ``kind="stable"`` breaks ties by gallery index, as ``evaluate_reid`` does.
    """
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind=kind)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    num_valid_q = 0
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        pos_idx = np.where(raw_cmc == 1)
        max_pos_idx = np.max(pos_idx)
        all_inp.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = np.asarray([x / (i + 1.0) for i, x in enumerate(tmp_cmc)]) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    cmc_curve = np.asarray(all_cmc).astype(np.float32).sum(0) / num_valid_q
    return {"cmc": cmc_curve, "mAP": float(np.mean(all_ap)), "mINP": float(np.mean(all_inp)),
            "num_valid_queries": num_valid_q}


def _case(name: str, evaluator: str, queue: mp.Queue) -> None:
    """Child process: build the problem, time distance + evaluation, report peak RSS."""
    import torch

    from dcal.metrics import compute_distance, evaluate_reid

    p = make_problem(name)
    t0 = time.perf_counter()
    distmat = compute_distance(p["qf"], p["gf"])
    t1 = time.perf_counter()
    if evaluator == "dcal":
        res = evaluate_reid(distmat, p["q_pids"], p["g_pids"], p["q_cams"], p["g_cams"])
    else:
        res = reference_eval_market1501(distmat, p["q_pids"], p["g_pids"], p["q_cams"], p["g_cams"])
    t2 = time.perf_counter()
    extra = {}
    if evaluator == "reference":  # untimed: the same algorithm with ties broken by gallery index
        st = reference_eval_market1501(distmat, p["q_pids"], p["g_pids"], p["q_cams"], p["g_cams"], kind="stable")
        extra = {"stable_cmc": [float(x) for x in st["cmc"]], "stable_mAP": st["mAP"], "stable_mINP": st["mINP"]}
    queue.put({**extra,
        "size": name, "evaluator": evaluator, "num_query": distmat.shape[0], "num_gallery": distmat.shape[1],
        "distance_s": t1 - t0, "eval_s": t2 - t1, "total_s": t2 - t0,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "threads": torch.get_num_threads(),
        "cmc": [float(x) for x in res["cmc"]], "mAP": res["mAP"], "mINP": res["mINP"],
        "num_valid_queries": res["num_valid_queries"],
    })


def run_case(name: str, evaluator: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(name, evaluator, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["msmt17", "market"])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-reference", action="store_true", help="skip the torchreid-style reference")
    args = ap.parse_args(argv)

    rows = []
    for name in args.sizes:
        rows.append(run_case(name, "dcal"))
        if name == "market" and not args.no_reference:
            rows.append(run_case(name, "reference"))

    print(f"{'size':<7} {'evaluator':<10} {'Q x G':>15} {'dist s':>7} {'eval s':>7} {'total s':>8} "
          f"{'peak GB':>8} {'mAP':>8} {'rank-1':>7}")
    for r in rows:
        print(f"{r['size']:<7} {r['evaluator']:<10} {r['num_query']:>6} x {r['num_gallery']:<6} "
              f"{r['distance_s']:7.1f} {r['eval_s']:7.2f} {r['total_s']:8.1f} {r['peak_rss_gb']:8.2f} "
              f"{r['mAP']:8.4f} {r['cmc'][0]:7.4f}")

    summary: dict[str, Any] = {"rows": rows, "machine": platform.platform(), "python": sys.version.split()[0]}
    ours = {r["size"]: r for r in rows if r["evaluator"] == "dcal"}
    ref = next((r for r in rows if r["evaluator"] == "reference"), None)
    ok = True
    if "msmt17" in ours:
        m = ours["msmt17"]
        met = m["total_s"] <= 60 and m["peak_rss_gb"] <= 8
        ok &= met
        print(f"MSMT17-sized: {m['total_s']:.1f} s, {m['peak_rss_gb']:.2f} GB peak "
              f"(target <= 60 s, <= 8 GB): {'met' if met else 'MISSED'}")
    if ref is not None:
        m = ours["market"]
        speedup = ref["eval_s"] / m["eval_s"]
        d_map, d_minp = abs(ref["stable_mAP"] - m["mAP"]), abs(ref["stable_mINP"] - m["mINP"])
        same_cmc = ref["stable_cmc"] == m["cmc"]
        agree = same_cmc and d_map < 1e-9 and d_minp < 1e-9 and ref["num_valid_queries"] == m["num_valid_queries"]
        u_map, u_minp = abs(ref["mAP"] - m["mAP"]), abs(ref["mINP"] - m["mINP"])
        ok &= agree and speedup >= 5
        summary.update(speedup_eval=speedup, agree_stable=agree, abs_diff_mAP=d_map, abs_diff_mINP=d_minp,
                       abs_diff_mAP_unstable_sort=u_map, abs_diff_mINP_unstable_sort=u_minp)
        print(f"Market-sized evaluation: {m['eval_s']:.2f} s vs reference {ref['eval_s']:.2f} s = "
              f"{speedup:.1f}x faster (target >= 5x)")
        print(f"  vs the reference with ties by gallery index (stable sort): agree {agree} "
              f"(|dmAP| {d_map:.1e}, |dmINP| {d_minp:.1e}, CMC identical: {same_cmc})")
        print(f"  vs torchreid's unstable np.argsort (tied float32 distances in another order): "
              f"|dmAP| {u_map:.1e}, |dmINP| {u_minp:.1e}, CMC identical: {ref['cmc'] == m['cmc']}")
    summary["targets_met"] = bool(ok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
