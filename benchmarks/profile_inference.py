"""Where DCAL's inference time goes: plain timm, DCAL SA-only, DCAL (SA + GLCA) and DCAL without the one-pass
attention kernel (the two-pass path: fused attention, then QKᵀ again in the rollout) interleaved in one process.

    python benchmarks/profile_inference.py --backbone vit_small_patch14_reg4_dinov2 --img-size 448 --batch 1 --profile

One model (random weights), the forwards run round-robin ``--reps`` times after one warm-up each, medians
printed with their ratios to timm; ``--profile`` adds ``torch.profiler``'s table of DCAL's most expensive operators
for one forward. In one process they share the machine's state at each moment, which makes a short run
steadier than ``bench_model.py`` (a process per variant), at the cost of no memory numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from dcal.model.dcal import create_model


def time_forwards(backbone: str, img_size: int, batch: int, reps: int) -> tuple[dict[str, float], object]:
    """Median seconds per batch of timm, SA-only and DCAL; and a callable running DCAL's forward once."""
    torch.manual_seed(0)
    model = create_model(backbone, num_classes=200, img_size=img_size, task="fgvc").eval()
    x = torch.randn(batch, 3, img_size, img_size)
    forwards = {"timm": lambda: model.backbone(x), "DCAL SA-only": lambda: model(x, branches=("sa",)),
                "DCAL (SA + GLCA)": lambda: model(x, branches=model.branches),
                "DCAL, two-pass": lambda: two_pass(model, x)}
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():
            forward()
        for _ in range(reps):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, forwards["DCAL (SA + GLCA)"]


def two_pass(model: torch.nn.Module, x: torch.Tensor) -> object:
    """DCAL's forward without the one-pass attention kernel (no inference workspace): timm's fused attention in
    every SA block, then the rollout recomputes each block's scores from its queries and keys."""
    model._workspace = lambda x, need_attn: contextlib.nullcontext(None)
    try:
        return model(x, branches=model.branches)
    finally:
        del model._workspace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="deit_tiny_patch16_224", help="timm model name")
    ap.add_argument("--img-size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (the median is printed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's operator table for DCAL")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    medians, dcal_forward = time_forwards(args.backbone, args.img_size, args.batch, args.reps)
    print(f"{args.backbone} {args.img_size}x{args.img_size} batch {args.batch}, {torch.get_num_threads()} threads, "
          f"medians of {args.reps}:")
    for name, seconds in medians.items():
        print(f"  {name:<18} {seconds:8.3f} s/batch  {seconds / medians['timm']:5.2f}x timm")
    if args.profile:
        with torch.inference_mode(), torch.profiler.profile() as prof:
            dcal_forward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
