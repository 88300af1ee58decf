"""One rollout step r ← r S_i at FGVC resolution, implementation by implementation (what DCAL inference pays).

    python benchmarks/bench_rollout.py [--batch 1 8 32] [--reps 7] [--threads N] [--clock wall|process] [--compile]

S_i = mean_h softmax(q kᵀ/√d) of one DeiT-T block at 448x448 (H = 3, d = 64, T = 785), queries and keys given
as views into one qkv tensor in timm's layout (what the SA block hands the rollout). Every candidate returns
r S_i (B, T); times are medians of ``--reps`` interleaved rounds, next to the fused attention of the block itself
(``F.scaled_dot_product_attention``, what timm pays per block) as the unit. Candidates:

* ``explicit maps``: softmax(q kᵀ) (B, H, T, T), head mean, then r S (inference before issue 11);
* ``softmax tiles``: :meth:`dcal.model.rollout.QueryKey.left_multiply` without the forward's normalisers (the path
  on CUDA, under dropout and while tracing): batched (image, head) problems, a softmax per tile of whole rows;
* ``batched tiles + lse, exp``: the first CPU version of issue 11, exp(s − lse) on batched problems, fresh tiles;
* ``per problem + lse, exp2 (eager)``: what DCAL runs on the CPU (``QueryKey.lse`` given) without the fused
  kernel when one (image, head) problem fills a tile, as here: per problem one ``addmm`` with the normaliser and
  log₂e folded in, exp2 in place, ``addmv``, one scratch tile for all blocks; also without the shared scratch
  (a fresh tile per block). At small T (several problems per tile, 256x128) the same runs on flattened batches
  of problems;
* ``fused kernel``: :mod:`dcal.model.fused_rollout` (what DCAL runs on the CPU where it builds), GEMM, exp2
  and the weighted row sum per chunk of 64, 128 or 256 query rows, and as DCAL calls it (about 128 rows);
* ``transposed flash``: one fused kernel per block, keys as queries over the queries with bias log r_t − lse_t;
  its log-sum-exp is log (r S)_j (needs the forward's lse, CPU only);
* ``explicit forward``: *not* a rollout step but the alternative design, one eager pass per block that computes
  the block's attention output and the head-averaged map from one GEMM (no second QKᵀ), the map then applied to
  r; compare it with the unit + a rollout step;
* ``compiled tiles`` (``--compile``): the softmax tile loop through ``torch.compile``.

A second table times exp and exp2 on one tile (T² arguments) by argument range: underflowing arguments hit slow
paths in both, far worse in exp (why the CPU path uses exp2, besides its speed on normal arguments).
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

from dcal.model import fused_rollout
from dcal.model.rollout import QueryKey

H, T, D_HEAD = 3, 785, 64


def _explicit(q: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    s = (q * D_HEAD**-0.5 @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
    return torch.bmm(r.unsqueeze(1), s).squeeze(1)


def _batched_exp(qk: QueryKey, r: torch.Tensor, tile_elements: int = 2**20) -> torch.Tensor:
    """Issue 11's first CPU version: scaled copies of q, k, problems flattened, exp(s − lse), fresh tiles."""
    B, H_, T_, d = qk.q.shape
    n = B * H_
    q = (qk.q * qk.scale).reshape(n, T_, d)
    kt = qk.k.contiguous().reshape(n, T_, d).transpose(1, 2)
    rr = r.unsqueeze(1).expand(B, H_, T_).reshape(n, 1, T_)
    lse = qk.lse.reshape(n, T_, 1)
    t = max(1, min(T_, tile_elements // T_))
    g = max(1, min(n, tile_elements // (t * T_)))
    out = torch.zeros(n, 1, T_)
    for a in range(0, n, g):
        b = min(a + g, n)
        for s in range(0, T_, t):
            e = min(s + t, T_)
            out[a:b].baddbmm_(rr[a:b, :, s:e], torch.bmm(q[a:b, s:e], kt[a:b]).sub_(lse[a:b, s:e]).exp_())
    return out.view(B, H_, T_).mean(dim=1)


def _transposed_flash(qk: QueryKey, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bias = (r.log().unsqueeze(1) - qk.lse).unsqueeze(2)  # (B, H, 1, T): log r_t − lse_t per key t
    _, lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qk.k, qk.q, v, attn_mask=bias, scale=qk.scale)
    return lse_t.exp().mean(dim=1)


def _explicit_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, rows: int = 256):
    """The alternative to a rollout step: the block's attention computed eagerly in tiles of query rows, one
    QKᵀ feeding both the output and the head-averaged map (B·T² floats kept per block), then r S."""
    B, H_, T_, d = q.shape
    o = torch.empty(B, T_, H_, d)
    s_map = torch.empty(B, T_, T_)
    for b in range(B):
        kt, vb = k[b].transpose(-2, -1), v[b]
        for s in range(0, T_, rows):
            e = min(s + rows, T_)
            p = torch.bmm(q[b, :, s:e], kt).mul_(d**-0.5).softmax(dim=-1)
            o[b, s:e] = torch.bmm(p, vb).transpose(0, 1)
            torch.sum(p, 0, out=s_map[b, s:e])
    return torch.bmm(r.unsqueeze(1), s_map).squeeze(1) / H_


def candidates(batch: int, use_compile: bool) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, T, 3, H, D_HEAD, generator=g).permute(2, 0, 3, 1, 4)  # timm's qkv layout
    q, k, v = qkv.unbind(0)
    r = torch.softmax(torch.randn(batch, T, generator=g), dim=-1)
    scale = D_HEAD**-0.5
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    qk = QueryKey(q, k, scale=scale)
    with_lse = QueryKey(q, k, lse, scale=scale)
    scratch = torch.empty(T * T)  # what rollout_cls_row shares across the blocks
    cands: dict[str, Callable[[], torch.Tensor]] = {
        "fused attention of the block (unit)": lambda: F.scaled_dot_product_attention(q, k, v),
        "explicit maps (before issue 11)": lambda: _explicit(q, k, r),
    }
    for e in (2**19, 2**20, 2**21):
        cands[f"softmax tiles {e * 4 // 2**10} KiB"] = lambda e=e: qk.left_multiply(r, tile_elements=e)
    cands["batched tiles + lse, exp (first)"] = lambda: _batched_exp(with_lse, r)
    cands["per problem + lse, exp2 (eager)"] = lambda: with_lse.left_multiply(r, buffer=scratch, fused=False)
    cands["  the same, fresh tile per block"] = lambda: with_lse.left_multiply(r, fused=False)
    if fused_rollout.available():
        for rows in (64, 128, 256):
            cands[f"fused kernel, {rows}-row chunks"] = lambda rows=rows: fused_rollout.left_multiply(
                q, k, with_lse.lse, r, scale, rows)
        cands["fused kernel (kept: as DCAL runs it)"] = lambda: with_lse.left_multiply(r)
    cands["transposed flash (one kernel)"] = lambda: _transposed_flash(with_lse, r, v)
    cands["explicit forward (output + map)"] = lambda: _explicit_forward(q, k, v, r)
    if use_compile:
        compiled = torch.compile(QueryKey.left_multiply, dynamic=False)
        cands["compiled softmax tiles 4 MiB"] = lambda: compiled(qk, r)
    return cands, _explicit(q, k, r)


def exp_by_range(reps: int, clock: Callable[[], float]) -> None:
    """exp and exp2 in place on T² arguments drawn from each range (one rollout tile)."""
    tile = torch.empty(T * T)
    print(f"\nexp / exp2 in place on {T}x{T} arguments, by range (µs, median of {reps})")
    print("  range              exp      exp2")
    for lo, hi in ((-10, 0), (-100, -88), (-140, -127), (-300, 0)):
        src = torch.empty(T * T).uniform_(lo, hi)
        row = []
        for op in (torch.Tensor.exp_, torch.Tensor.exp2_):
            times = []
            for _ in range(reps):
                tile.copy_(src)
                t0 = clock()
                op(tile)
                times.append(clock() - t0)
            row.append(statistics.median(times) * 1e6)
        print(f"  [{lo}, {hi}]".ljust(18) + "".join(f"{t:9.0f}" for t in row))


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
    exp_by_range(max(args.reps, 15), clock)
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"
    print(f"\nload average after: {load}", file=sys.stdout)


if __name__ == "__main__":
    main()
