"""One rollout step r ← r S_i at FGVC resolution, implementation by implementation (what DCAL inference pays).

    python benchmarks/bench_rollout.py [--batch 1 8 32] [--reps 7] [--threads N] [--clock wall|process] [--compile]

S_i = mean_h softmax(q kᵀ/√d) of one DeiT-T block at 448x448 (H = 3, d = 64, T = 785). Every candidate gets the
same random queries/keys and returns r S_i (B, T); times are medians of ``--reps`` interleaved rounds, next to the
fused attention of the block itself (``F.scaled_dot_product_attention``, what timm pays per block) as the unit.
Candidates:

* ``explicit maps``: softmax(q kᵀ) (B, H, T, T), head mean, then r S (what DCAL inference did before);
* ``tiles t=..``: :meth:`dcal.model.rollout.QueryKey.left_multiply` with a tile of ``t`` scores (what DCAL does);
* ``tiles + forward lse``: the same with ``QueryKey.lse``, the softmax normalisers taken from the forward
  (``aten._scaled_dot_product_flash_attention_for_cpu`` returns them): exp(s − lse) instead of a softmax;
* ``transposed flash``: one fused kernel per block, keys as queries over the queries with bias log r_t − lse_t;
  its log-sum-exp is log (r S)_j (needs the forward's lse, CPU only);
* ``compiled tiles`` (``--compile``): the tile loop through ``torch.compile``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dcal.model.rollout import QueryKey

H, T, D_HEAD = 3, 785, 64


def _explicit(qk: QueryKey, r: torch.Tensor) -> torch.Tensor:
    s = (qk.q @ qk.k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
    return torch.bmm(r.unsqueeze(1), s).squeeze(1)


def _transposed_flash(qk: QueryKey, r: torch.Tensor, v: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    bias = (r.log().unsqueeze(1) - lse).unsqueeze(2)  # (B, H, 1, T): log r_t − lse_t per key t
    _, lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qk.k, qk.q, v, attn_mask=bias, scale=1.0)
    return lse_t.exp().mean(dim=1)


def candidates(batch: int, use_compile: bool) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, H, T, D_HEAD, generator=g) for _ in range(3))
    r = torch.softmax(torch.randn(batch, T, generator=g), dim=-1)
    qk = QueryKey(q * D_HEAD**-0.5, k)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    lse = lse.contiguous()
    cands: dict[str, Callable[[], torch.Tensor]] = {
        "fused attention of the block (unit)": lambda: F.scaled_dot_product_attention(q, k, v),
        "explicit maps (before)": lambda: _explicit(qk, r),
    }
    for e in (2**17, 2**19, 2**20, 2**21, 2**23):
        cands[f"tiles {e * 4 // 2**10} KiB"] = lambda e=e: qk.left_multiply(r, tile_elements=e)
    with_lse = QueryKey(qk.q, qk.k, lse)
    for e in (2**19, 2**20):
        cands[f"tiles {e * 4 // 2**10} KiB + forward lse"] = lambda e=e: with_lse.left_multiply(r, tile_elements=e)
    cands["transposed flash (one kernel)"] = lambda: _transposed_flash(qk, r, v, lse)
    if use_compile:
        compiled = torch.compile(QueryKey.left_multiply, dynamic=False)
        cands["compiled tiles 2 MiB"] = lambda: compiled(qk, r)
    return cands, _explicit(qk, r)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="also time the tile loop under torch.compile")
    ap.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process = CPU seconds of this process: with --threads 1 the work itself, insensitive to "
        "other processes on a shared machine",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"
    print(
        f"torch {torch.__version__}, {args.threads} threads, load average {load}; DeiT-T block at 448: "
        f"H={H}, T={T}, d={D_HEAD}; medians of {args.reps} interleaved rounds, {args.clock} clock"
    )
    for batch in args.batch:
        cands, want = candidates(batch, args.compile)
        times: dict[str, list[float]] = {name: [] for name in cands}
        errors = {}
        for name, fn in cands.items():  # warm-up (and compilation); error against the explicit maps
            got = fn()
            if got.shape == want.shape:
                errors[name] = ((got - want).abs().max() / want.abs().max()).item()
        for _ in range(args.reps):
            for name, fn in cands.items():
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        unit = statistics.median(times["fused attention of the block (unit)"])
        print(f"\nbatch {batch}                          ms/block   x fused attention   max rel. error")
        for name in cands:
            m = statistics.median(times[name])
            err = f"{errors[name]:.1e}" if name in errors else "—"
            print(f"  {name:36s} {m * 1e3:8.1f}   {m / unit:8.2f}            {err}")
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"
    print(f"\nload average after: {load}", file=sys.stdout)


if __name__ == "__main__":
    main()
