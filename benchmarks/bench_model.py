"""DCAL against its compute floor: training/inference time, peak training memory and FLOP ratios, side by side.

One command, one run: ``python benchmarks/bench_model.py [--cases fgvc reid] [--batch N] [--img-size ...]
[--infer-batches 1 8 32] [--device cpu|cuda] [--no-fused-rollout] [--reps 5] [--infer-reps 15] [--warmup 2]
[--json out.json] [--markdown out.md]``.
See ``benchmarks/README.md`` for how to read it.

How it measures (and why):

* every model variant lives in its **own spawned process** (fresh allocator, its own ``ru_maxrss``), all alive
  at once; the parent asks them for one timed step each in **round-robin**, repetition after repetition, so a
  change of machine load during the run hits every variant alike and the ratios stay fair;
* a training step = ``zero_grad`` + forward + loss + backward + ``AdamW.step``; inference = ``model.eval()`` and
  ``predict`` (FGVC) / ``embed`` (Re-ID) under ``torch.inference_mode()``; medians over ``--reps`` training
  and ``--infer-reps`` inference rounds after ``--warmup`` rounds that are not counted;
* peak training memory = ``ru_maxrss`` of the variant's process after all its training steps minus its
  ``ru_maxrss`` after the model and optimizer were built: activations, gradients, AdamW state and temporaries
  of a step (CPU has no allocator statistics; RSS is what the machine must have);
* FLOPs = ``torch.utils.flop_counter.FlopCounterMode`` with every attention explicit (``dcal.model.complexity``),
  one forward in the mode that is timed (train mode counts the PWCA stream); training FLOPs taken as 3x forward;
* ``--device cuda``: the same cases on the GPU with bf16 autocast around forward + loss (SDPA picks its fused
  kernels), ``torch.cuda.synchronize`` before every timer read, and peak memory from the CUDA caching
  allocator (``max_memory_allocated``) instead of RSS; without a CUDA device it refuses (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One benchmark setting: backbone, input, batch and the training variants compared."""

    name: str
    arch: str
    task: str
    img_size: tuple[int, int]
    batch: int
    num_classes: int
    train_variants: tuple[str, ...]
    infer_variants: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)  # the recipe's data pipeline, if measured
    infer_batches: tuple[int, ...] = ()  # inference batch sweep; () = the training batch only

    @property
    def inference_batches(self) -> tuple[int, ...]:
        return self.infer_batches or (self.batch,)


# variant -> (glca_blocks, pwca_blocks, grad checkpointing); "timm" = timm.create_model with the same arch
VARIANTS: dict[str, tuple[int, int, bool] | None] = {
    "timm": None,
    "sa": (0, 0, False),
    "+glca": (1, 0, False),
    "+pwca": (0, 12, False),
    "dcal": (1, 12, False),
    "dcal+ckpt": (1, 12, True),
    "dcal-eager": (1, 12, False),  # inference with DCAL_FUSED_ROLLOUT=0: what a machine without a compiler runs
    "dcal-freeze": (1, 12, False),  # + model.freeze_blocks = half the depth (stem and first blocks frozen)
    "dcal-lora": (1, 12, False),  # + model.lora rank LORA_RANK on qkv, proj, fc1, fc2 (backbone weights frozen)
}
LORA_RANK = 8
LABELS = {
    "timm": "plain timm",
    "sa": "DCAL SA-only",
    "+glca": "DCAL SA+GLCA",
    "+pwca": "DCAL SA+PWCA",
    "dcal": "DCAL full",
    "dcal+ckpt": "DCAL full + grad checkpointing",
    "dcal-eager": "DCAL, eager rollout tiles",
    "dcal-freeze": "DCAL, first half of the blocks frozen",
    "dcal-lora": f"DCAL, LoRA r={LORA_RANK} (backbone frozen)",
}
ALL_TRAIN = ("timm", "sa", "+glca", "+pwca", "dcal")
ALL_INFER = ("timm", "sa", "dcal")

CASES = {
    "fgvc": Case("fgvc", "deit_tiny_patch16_224", "fgvc", (448, 448), 8, 200, ALL_TRAIN, ALL_INFER + ("dcal-eager",),
                 {"dataset": "cub", "root": str(DATA / "cub100"), "resize": 550}, infer_batches=(1, 8, 32)),
    "reid": Case("reid", "deit_small_patch16_224", "reid", (256, 128), 32, 751, ALL_TRAIN, ALL_INFER,
                 {"dataset": "market1501", "root": str(DATA / "market1501_mini"), "resize": None}),
    # A 2024-era backbone with registers (issue 19): DINOv2-reg ViT-S/14 at 448, 1,024 patches + 5 prefix tokens
    # (class token + 4 registers), the same variants and ratios as the DeiT case (slow on a CPU: opt-in).
    "dinov2reg": Case("dinov2reg", "vit_small_patch14_reg4_dinov2", "fgvc", (448, 448), 4, 200, ALL_TRAIN,
                      ALL_INFER + ("dcal-eager",), infer_batches=(1, 8)),
    # Memory saving of activation checkpointing on the largest model at the FGVC resolution (slow: opt-in).
    "vitb448-ckpt": Case("vitb448-ckpt", "vit_base_patch16_224", "fgvc", (448, 448), 2, 200, ("dcal", "dcal+ckpt")),
    # Parameter-efficient fine-tuning (dcal.model.finetune) against full fine-tuning, same model (opt-in).
    "finetune": Case("finetune", "deit_small_patch16_224", "fgvc", (448, 448), 8, 200,
                     ("dcal", "dcal-freeze", "dcal-lora")),
}
DEFAULT_CASES = ("fgvc", "reid")


def build_variant(case: Case, variant: str) -> torch.nn.Module:
    import timm

    import dcal

    spec = VARIANTS[variant]
    if spec is None:
        # Re-ID baseline: timm's own classifier over the identities (DCAL adds the BNNeck + triplet on top).
        return timm.create_model(case.arch, num_classes=case.num_classes, img_size=case.img_size)
    glca, pwca, ckpt = spec
    model = dcal.create_model(case.arch, task=case.task, num_classes=case.num_classes, img_size=case.img_size,
                              glca_blocks=glca, pwca_blocks=pwca)
    model.set_grad_checkpointing(ckpt)
    if variant in ("dcal-freeze", "dcal-lora"):
        from dcal.model.finetune import LoraSettings, apply_finetune

        if variant == "dcal-freeze":
            apply_finetune(model, freeze_blocks=len(model.backbone.blocks) // 2)
        else:
            apply_finetune(model, lora=LoraSettings(rank=LORA_RANK))
    return model


def fake_batch(case: Case, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and targets in P x K form (batch/4 identities x 4 images; also valid FGVC labels)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *case.img_size, generator=g)
    targets = torch.arange(batch) // 4 % case.num_classes
    return images, targets


# ------------------------------------------------------------------------------------------------ worker
def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a timer read after it measures them (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    """High-water mark of the process: resident set (CPU), or the caching allocator's peak allocation (CUDA)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _maxrss_mb()


def _worker(conn: Any, case: Case, variant: str, threads: int, device_name: str = "cpu") -> None:
    """One variant in its own process: build, then answer 'train' / ('infer', batch) / 'mem' / 'stop' commands.

    On CUDA: bf16 autocast around forward + loss (SDPA then runs its fused flash/efficient kernels), the timer
    read after ``torch.cuda.synchronize``, memory from the CUDA caching allocator's peak statistics.
    """
    import torch.nn.functional as F

    from dcal.losses import DCALLoss, param_groups
    from dcal.model.dcal import autocast

    if variant == "dcal-eager":
        os.environ["DCAL_FUSED_ROLLOUT"] = "0"  # this process only (spawned), before the first rollout
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    precision = "bf16" if device.type == "cuda" else "fp32"
    model = build_variant(case, variant).train().to(device)
    images, targets = (t.to(device) for t in fake_batch(case, case.batch))
    infer_images = {b: fake_batch(case, b)[0].to(device) for b in case.inference_batches}
    if VARIANTS[variant] is None:
        crit = None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    else:
        crit = DCALLoss(case.task, model.branches)
        opt = torch.optim.AdamW(param_groups(model, crit, 0.05), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _peak_mb(device)
    train_peak = None
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "train":
            model.train()
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                out = model(images) if crit is None else model(images, targets=targets)
                loss = F.cross_entropy(out, targets) if crit is None else crit(out, targets).total
            loss.backward()
            opt.step()
            _sync(device)
            conn.send(time.perf_counter() - t0)
        elif isinstance(cmd, tuple) and cmd[0] == "infer":
            x = infer_images[cmd[1]]
            model.eval()
            with torch.inference_mode(), autocast(device, precision):
                _sync(device)
                t0 = time.perf_counter()
                if crit is None:
                    model(x)
                elif case.task == "fgvc":
                    model.predict(x)
                else:
                    model.embed(x)
                _sync(device)
                conn.send(time.perf_counter() - t0)
        elif cmd == "mem":  # asked right after the training steps: the high-water mark of training
            train_peak = _peak_mb(device) if train_peak is None else train_peak
            conn.send({"baseline_mb": base_rss, "maxrss_mb": train_peak, "train_peak_mb": train_peak - base_rss,
                       "saved_mb": _saved_for_backward_mb(model, images, targets, crit is None),
                       "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        else:
            conn.close()
            return


def _saved_for_backward_mb(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, plain: bool) -> float:
    """MB of distinct storages autograd saves for the backward in one training forward (parameters included).

    The allocator-independent part of training memory: RSS adds transients and allocator high-water on top.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images) if plain else model(images, targets=targets)
    del out
    return sum(storages.values()) / 2**20


def measure_case(case: Case, reps: int, warmup: int, threads: int, log: Any, device: str = "cpu",
                 infer_reps: int | None = None) -> dict[str, Any]:
    """Round-robin timing of all variants of ``case`` (each in its own process); memory per process.

    Inference: every round visits each batch size of the sweep and, within it, every variant in turn."""
    ctx = mp.get_context("spawn")
    variants = list(dict.fromkeys(case.train_variants + case.infer_variants))
    procs, conns = {}, {}
    for v in variants:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, case, v, threads, device), daemon=True)
        p.start()
        procs[v], conns[v] = p, parent
    for v in variants:
        if conns[v].recv() != "ready":
            raise RuntimeError(f"worker {v} failed to start")
    train: dict[str, list[float]] = {v: [] for v in case.train_variants}
    infer: dict[int, dict[str, list[float]]] = {b: {v: [] for v in case.infer_variants}
                                                for b in case.inference_batches}
    try:
        for r in range(warmup + reps):
            for v in case.train_variants:
                conns[v].send("train")
                t = conns[v].recv()
                if r >= warmup:
                    train[v].append(t)
            log(f"  [{case.name}] train round {r + 1}/{warmup + reps}: "
                + ("warm-up" if r < warmup else ", ".join(f"{v} {t:.2f}s" for v, t in _last(train))))
        memory = {}
        for v in case.train_variants:
            conns[v].send("mem")
            memory[v] = conns[v].recv()
        infer_reps = reps if infer_reps is None else infer_reps
        for r in range(warmup + infer_reps):
            for b in case.inference_batches:
                for v in case.infer_variants:
                    conns[v].send(("infer", b))
                    t = conns[v].recv()
                    if r >= warmup:
                        infer[b][v].append(t)
        for b in case.inference_batches if case.infer_variants else ():
            medians = ", ".join(f"{v} {statistics.median(t):.3f}s" for v, t in infer[b].items())
            log(f"  [{case.name}] inference, batch {b}: {medians}")
    finally:
        for v in variants:
            try:
                conns[v].send("stop")
            except (BrokenPipeError, OSError):
                pass
            procs[v].join(timeout=30)
    return {"train_s": train, "infer_s": infer, "memory": memory}


def _last(times: dict[str, list[float]]) -> list[tuple[str, float]]:
    return [(v, t[-1]) for v, t in times.items() if t]


# ------------------------------------------------------------------------------------------------- FLOPs
def forward_flops(case: Case, variant: str, train: bool) -> int:
    """FLOPs (multiply + add) of one forward of one image in train or eval mode, attention explicit.

    Train mode runs 2 images (PWCA pairs each image with another) and halves the count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from dcal.model.attention import explicit_attention

    torch.manual_seed(0)
    model = build_variant(case, variant).train(train)
    n = 2 if train else 1
    images, targets = fake_batch(case, n)
    plain = VARIANTS[variant] is None
    with torch.no_grad(), explicit_attention(model), FlopCounterMode(display=False) as counter:
        if plain:
            model(images)
        elif train:
            model(images, targets=targets)
        else:  # what inference runs: predict/embed = the SA and GLCA branches
            model(images, branches=model.branches)
    return counter.get_total_flops() // n


# ------------------------------------------------------------------------------------------ data pipeline
def _data_worker(conn: Any, task: str, spec: dict[str, Any], img_size: tuple[int, int], n: int, reps: int) -> None:
    """One process, one thread (as a DataLoader worker): images/s of ``dataset[i]`` with the recipe transform."""
    torch.set_num_threads(1)
    note = "dcal.data.build_dataset + dcal.data.transforms.build_transforms"
    try:
        from dcal.data import build_dataset
        from dcal.data.transforms import build_transforms

        transform = build_transforms(task, True, img_size, resize=spec["resize"])
        ds = build_dataset(spec["dataset"], spec["root"], "train", transform)
        get = ds.__getitem__
        size = len(ds)
    except Exception as e:  # noqa: BLE001 - the readers belong to others: fall back to PIL + the same recipe
        note = f"fallback to PIL + torchvision.transforms.v2 (dcal.data unavailable: {e!r})"
        get, size = _fallback_dataset(task, spec, img_size)
    for i in range(min(8, size)):  # warm-up: first file reads, lazy imports
        get(i)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            get(i % size)
        rates.append(n / (time.perf_counter() - t0))
    conn.send({"images_per_s": statistics.median(rates), "all": rates, "items": n, "dataset_size": size,
               "reader": note})
    conn.close()


def _fallback_dataset(task: str, spec: dict[str, Any], img_size: tuple[int, int]) -> tuple[Any, int]:
    from PIL import Image
    from torchvision.transforms import v2

    files = sorted(p for p in Path(spec["root"]).rglob("*.jpg") if "query" not in p.parts and "test" not in str(p))
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    if task == "fgvc":
        tf = v2.Compose([v2.Resize((spec["resize"],) * 2, antialias=True), v2.RandomCrop(img_size),
                         v2.RandomHorizontalFlip(), *norm])
    else:
        tf = v2.Compose([v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                         v2.RandomHorizontalFlip(), v2.Pad(10), v2.RandomCrop(img_size), *norm,
                         v2.RandomErasing(p=0.5, value="random")])
    return (lambda i: tf(Image.open(files[i]).convert("RGB"))), len(files)


def measure_data(case: Case, n: int, reps: int) -> dict[str, Any] | None:
    if not case.data:
        return None
    if not Path(case.data["root"]).is_dir():
        return {"skipped": f"{case.data['root']} is absent"}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_data_worker, args=(child, case.task, case.data, case.img_size, n, reps), daemon=True)
    p.start()
    result = parent.recv()
    p.join(timeout=30)
    return {**case.data, **result}


# ------------------------------------------------------------------------------ --quick: one process
@dataclass
class QuickSetting:
    """One headline setting of ``--quick``: DCAL inference against plain timm, same weights, one process."""

    name: str
    arch: str
    task: str
    img_size: tuple[int, int]
    batches: tuple[int, ...]
    parts_batch: int  # the batch of the per-part table
    num_classes: int = 200
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # tests shrink the backbone with these


QUICK = (
    QuickSetting("DeiT-T 448", "deit_tiny_patch16_224", "fgvc", (448, 448), (1, 8, 32), 8),
    QuickSetting("DeiT-S 448", "deit_small_patch16_224", "fgvc", (448, 448), (1, 8, 32), 1),
    QuickSetting("DeiT-S Re-ID 256x128", "deit_small_patch16_224", "reid", (256, 128), (32,), 32, 751),
)
TIMM_PARTS = ("embed", "SA blocks", "heads")
DCAL_PARTS = ("embed", "SA blocks", "rollout", "selection", "GLCA", "heads")


class _Clock:
    """Seconds per named part, read at each :meth:`mark` (the time since the previous mark)."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.last = time.perf_counter()

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now


def timm_parts(vit: Any, x: torch.Tensor, clock: _Clock) -> torch.Tensor:
    """timm ``VisionTransformer.forward`` in its own steps (what ``forward_features`` and ``forward_head`` run)."""
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    clock.mark("embed")
    t = vit.blocks(t)
    clock.mark("SA blocks")
    out = vit.forward_head(vit.norm(t))
    clock.mark("heads")
    return out


def dcal_parts(model: Any, x: torch.Tensor, clock: _Clock) -> torch.Tensor:
    """DCAL ``predict`` (FGVC) / ``embed`` (Re-ID) in the steps of ``DCAL.forward`` (a test pins the result)."""
    from dcal.model.rollout import select_top

    x0, rope = model._embed(x)
    clock.mark("embed")
    with model._workspace(x0, True) as workspace:
        x_prev, x_last, attentions = model._sa_stream(x0, rope, True, workspace)
        clock.mark("SA blocks")
        scores = model._scores(attentions, x_last, "rollout")
        clock.mark("rollout")
        selected = select_top(scores, model.num_local_queries)
        del attentions
        clock.mark("selection")
    tokens = model._glca_stream(x_prev, selected, rope)
    clock.mark("GLCA")
    out: dict[str, Any] = {"logits": {}, "features": {}, "bn_features": {}}
    model._head("sa", x_last, out)
    model._head("glca", tokens, out)
    if model.cfg.task == "fgvc":
        result = sum(out["logits"][b].softmax(dim=-1) for b in ("sa", "glca"))
    else:
        result = torch.cat([out["features"][b] for b in ("sa", "glca")], dim=-1)
    clock.mark("heads")
    return result


def quick_forwards(model: Any, x: torch.Tensor, parts: bool) -> dict[str, Any]:
    """The callables one round times: timm (the model's own backbone), DCAL SA-only, DCAL; with ``parts`` also
    timm's and DCAL's forwards split into parts (they return a :class:`_Clock`)."""
    fgvc = model.cfg.task == "fgvc"
    forwards: dict[str, Any] = {
        "timm": lambda: model.backbone(x),
        "sa": lambda: model.predict(x, "sa") if fgvc else model.embed(x, "sa"),
        "dcal": lambda: model.predict(x) if fgvc else model.embed(x),
    }
    if parts:
        forwards["timm parts"] = _clocked(lambda clock: timm_parts(model.backbone, x, clock))
        forwards["dcal parts"] = _clocked(lambda clock: dcal_parts(model, x, clock))
    return forwards


def _clocked(fn: Any) -> Any:
    def run() -> _Clock:
        clock = _Clock()
        fn(clock)
        return clock

    return run


def quick(settings: tuple[QuickSetting, ...] = QUICK, rounds: int = 3, log: Any = print) -> list[dict[str, Any]]:
    """Medians over ``rounds`` interleaved rounds per (setting, batch): each round runs timm, SA-only and DCAL
    once each (and, at the setting's ``parts_batch``, both split into parts). No separate warm-up: one call at
    batch 1 warms the code paths, and the median of three rounds drops a cold first one."""
    import dcal

    results = []
    for st in settings:
        torch.manual_seed(0)
        model = dcal.create_model(st.arch, task=st.task, num_classes=st.num_classes, img_size=st.img_size,
                                  glca_blocks=1, pwca_blocks=0, **st.timm_kwargs).eval()
        with torch.inference_mode():
            for fn in quick_forwards(model, torch.randn(1, 3, *st.img_size), True).values():
                fn()
            for b in st.batches:
                x = torch.randn(b, 3, *st.img_size, generator=torch.Generator().manual_seed(b))
                forwards = quick_forwards(model, x, b == st.parts_batch)
                times: dict[str, list[Any]] = {name: [] for name in forwards}
                for _ in range(rounds):
                    for name, fn in forwards.items():
                        t0 = time.perf_counter()
                        got = fn()
                        times[name].append(got.parts if isinstance(got, _Clock) else time.perf_counter() - t0)
                row: dict[str, Any] = {"setting": st.name, "batch": b,
                                       **{v: statistics.median(times[v]) for v in ("timm", "sa", "dcal")}}
                for name, keys in (("timm parts", TIMM_PARTS), ("dcal parts", DCAL_PARTS)):
                    if name in times:
                        row[name] = {k: statistics.median(p[k] for p in times[name]) for k in keys}
                log(f"  [quick] {st.name}, batch {b}: timm {row['timm']:.3f}s, SA-only {row['sa']:.3f}s, "
                    f"DCAL {row['dcal']:.3f}s")
                results.append(row)
        model.release_workspace()
    return results


def format_quick(results: list[dict[str, Any]], rounds: int) -> str:
    """The headline ratios, then per setting the per-part table (timm and DCAL side by side)."""
    out = [f"Inference, medians of {rounds} interleaved rounds in one process (same weights: timm = the DCAL "
           "model's own backbone):", "",
           "| setting | batch | timm s/batch | SA-only / timm | DCAL / timm |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        out.append(f"| {r['setting']} | {r['batch']} | {r['timm']:.3f} | {r['sa'] / r['timm']:.3f} | "
                   f"{r['dcal'] / r['timm']:.3f} |")
    for r in results:
        if "dcal parts" not in r:
            continue
        tp, dp = r["timm parts"], r["dcal parts"]
        out += ["", f"Where the time goes, {r['setting']}, batch {r['batch']} (medians per part, s/batch; DCAL's "
                "SA blocks write the head-mean maps, its heads include GLCA's and the fusion):", "",
                "| part | timm | DCAL | DCAL − timm |", "| --- | ---: | ---: | ---: |"]
        for part in DCAL_PARTS:
            t = tp.get(part)
            out.append(f"| {part} | {'—' if t is None else f'{t:.4f}'} | {dp[part]:.4f} | "
                       f"{dp[part] - (t or 0.0):+.4f} |")
        t_sum, d_sum = sum(tp.values()), sum(dp.values())
        out.append(f"| sum of parts | {t_sum:.4f} | {d_sum:.4f} | {d_sum - t_sum:+.4f} |")
        out.append(f"| whole forward | {r['timm']:.4f} | {r['dcal']:.4f} | {r['dcal'] - r['timm']:+.4f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- report
def summarise(case: Case, raw: dict[str, Any], flops: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Medians, ratios against plain timm (or the first variant) and the FLOP ratios of the same pairs."""
    med_t = {v: statistics.median(t) for v, t in raw["train_s"].items()}
    med_ib = {b: {v: statistics.median(t) for v, t in per.items()} for b, per in raw["infer_s"].items()}
    ref = "timm" if "timm" in med_t else case.train_variants[0]
    mem = {v: m["train_peak_mb"] for v, m in raw["memory"].items()}
    saved = {v: m["saved_mb"] for v, m in raw["memory"].items()}
    rows = []
    for v in case.train_variants:
        ratio = med_t[v] / med_t[ref]
        fr = flops["train"][v] / flops["train"][ref]
        rows.append({"variant": v, "step_s": med_t[v], "images_per_s": case.batch / med_t[v], "ratio": ratio,
                     "flop_ratio": fr, "ratio_over_flop_ratio": ratio / fr, "peak_mb": mem[v], "saved_mb": saved[v],
                     "train_gflops_per_image": 3 * flops["train"][v] / 1e9})
    infer_rows = []
    for b, med_i in med_ib.items():
        for v in case.infer_variants:
            infer_rows.append({"variant": v, "batch": b, "batch_s": med_i[v], "images_per_s": b / med_i[v],
                               "ratio": med_i[v] / med_i["timm"],
                               "flop_ratio": flops["infer"][v] / flops["infer"]["timm"],
                               "gflops_per_image": flops["infer"][v] / 1e9})
    targets = []
    if {"timm", "sa", "dcal"} <= set(med_t):
        fr = flops["train"]["dcal"] / flops["train"]["timm"]
        targets += [
            ("train: SA-only / timm", med_t["sa"] / med_t["timm"], 1.05, flops["train"]["sa"] / flops["train"]["timm"]),
            ("train: full DCAL / timm, over its FLOP ratio", med_t["dcal"] / med_t["timm"] / fr, 1.05, fr),
            ("memory: full DCAL / SA-only (peak RSS)", mem["dcal"] / mem["sa"], 2.3,
             flops["train"]["dcal"] / flops["train"]["sa"]),
            ("memory: full DCAL / SA-only (saved for backward)", saved["dcal"] / saved["sa"], 2.3,
             flops["train"]["dcal"] / flops["train"]["sa"]),
        ]
    for b, med_i in med_ib.items():
        if not {"timm", "sa", "dcal"} <= set(med_i):
            continue
        limit = 1.30 if max(case.img_size) >= 384 else 1.10  # issue 11: 1.3x at 448 (stretch 1.15x)
        targets += [
            (f"inference, batch {b}: SA-only / timm", med_i["sa"] / med_i["timm"], 1.05,
             flops["infer"]["sa"] / flops["infer"]["timm"]),
            (f"inference, batch {b}: DCAL / timm", med_i["dcal"] / med_i["timm"], limit,
             flops["infer"]["dcal"] / flops["infer"]["timm"]),
        ]
        if "dcal-eager" in med_i:  # no target: the fallback, for comparison
            targets.append((f"inference, batch {b}: DCAL with eager rollout tiles / timm",
                            med_i["dcal-eager"] / med_i["timm"], None, flops["infer"]["dcal"] / flops["infer"]["timm"]))
    if {"dcal", "dcal+ckpt"} <= set(med_t):
        # no target: checkpointing trades recomputation (about one more forward) for memory
        targets.append(("memory: checkpointing / without (peak RSS)", mem["dcal+ckpt"] / mem["dcal"], None, 1.0))
        targets.append(("train: checkpointing / without", med_t["dcal+ckpt"] / med_t["dcal"], None, 1.0))
    trainable = {v: m.get("trainable_params") for v, m in raw["memory"].items()}
    for v in ("dcal-freeze", "dcal-lora"):
        if {"dcal", v} <= set(med_t):
            # no target: what fine-tuning fewer parameters saves (activations of frozen blocks, gradients, AdamW
            # state); the FLOP column is the forward's (the backward of frozen blocks is skipped: not counted)
            what = LABELS[v].removeprefix("DCAL, ")
            targets += [(f"train: {what} / full fine-tuning", med_t[v] / med_t["dcal"], None,
                         flops["train"][v] / flops["train"]["dcal"]),
                        (f"memory: {what} / full fine-tuning (peak)", mem[v] / mem["dcal"], None, 1.0),
                        (f"memory: {what} / full fine-tuning (saved for backward)", saved[v] / saved["dcal"], None,
                         1.0),
                        (f"trainable parameters: {what} / full fine-tuning", trainable[v] / trainable["dcal"], None,
                         1.0)]
    return {"train": rows, "infer": infer_rows,
            "targets": [{"what": w, "measured": m, "limit": lim, "met": None if lim is None else m <= lim,
                         "flop_ratio": f} for w, m, lim, f in targets]}


def format_case(case: Case, s: dict[str, Any], data: dict[str, Any] | None) -> str:
    h, w = case.img_size
    ref = "timm" if "timm" in case.train_variants else LABELS[case.train_variants[0]]
    out = [f"### {case.name}: {case.arch} {h}x{w}, batch {case.batch} (inference: "
           f"{', '.join(map(str, case.inference_batches))}), {case.num_classes} classes, task {case.task}",
           "",
           f"| training step (AdamW) | median s/step | images/s | time vs {ref} | FLOP ratio | time / FLOP ratio "
           "| peak train memory (MB) | saved for backward (MB) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["train"]:
        out.append(f"| {LABELS[r['variant']]} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | {r['ratio']:.2f} | "
                   f"{r['flop_ratio']:.2f} | {r['ratio_over_flop_ratio']:.2f} | {r['peak_mb']:.0f} | "
                   f"{r['saved_mb']:.0f} |")
    if s["infer"]:
        out += ["", "| inference (inference_mode) | batch | median s/batch | images/s | time vs timm | FLOP ratio | "
                "GFLOPs/image |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in s["infer"]:
            name = {"dcal": "DCAL (SA + GLCA)"}.get(r["variant"], LABELS[r["variant"]])
            out.append(f"| {name} | {r['batch']} | {r['batch_s']:.3f} | {r['images_per_s']:.1f} | {r['ratio']:.2f} | "
                       f"{r['flop_ratio']:.2f} | {r['gflops_per_image']:.2f} |")
    if s["targets"]:
        out += ["", "| ratio | measured | target | met | FLOP ratio of the pair |",
                "| --- | ---: | ---: | :---: | ---: |"]
        for t in s["targets"]:
            lim = "—" if t["limit"] is None else f"<= {t['limit']:.2f}"
            met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
            out.append(f"| {t['what']} | {t['measured']:.2f} | {lim} | {met} | {t['flop_ratio']:.2f} |")
    if data:
        out.append("")
        if "skipped" in data:
            out.append(f"Data pipeline: skipped ({data['skipped']}).")
        else:
            model_ips = next(r["images_per_s"] for r in s["train"] if r["variant"] == case.train_variants[-1])
            out.append(
                f"Data pipeline ({data['dataset']}, decode + train transform, 1 process 1 thread, "
                f"{data['items']} items): **{data['images_per_s']:.0f} images/s per worker** vs full DCAL "
                f"training **{model_ips:.1f} images/s** → {model_ips / data['images_per_s']:.2f} workers "
                f"keep the model fed. Reader: {data['reader']}."
            )
    return "\n".join(out)


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:  # built (or found in the cache) here, before the variants' processes start and would each wait for it
        from dcal.model import fused_rollout

        info["rollout"] = ("fused CPU kernel" if fused_rollout.available() else
                           f"eager tiles ({fused_rollout.why_unavailable()})")
    return info


def check_device(device: str) -> str | None:
    """Why ``device`` cannot be benchmarked here, or None when it can."""
    if device == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built}, "
                "torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU, or use --device cpu")
    return None


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES),
                    help="settings to run (default: fgvc reid; vitb448-ckpt = grad checkpointing on ViT-B, slow; "
                         "finetune = full fine-tuning vs freeze_blocks vs LoRA on DeiT-S at 448)")
    ap.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    ap.add_argument("--img-size", type=int, nargs="+", default=None, help="override the input size: S or H W")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    ap.add_argument("--infer-reps", type=int, default=None,
                    help="timed inference rounds (default: 3x --reps; a round is a fraction of a training round, "
                         "and the inference ratios at 448 sit close to their target)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up repetitions per variant")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--infer-batches", type=int, nargs="+", default=None,
                    help="override every case's inference batch sweep (default: fgvc 1 8 32, others their batch)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: bf16 autocast, fused SDPA kernels, synchronised timers, peak CUDA memory")
    ap.add_argument("--no-fused-rollout", action="store_true",
                    help="CPU: the eager rollout tiles instead of the fused kernel (sets DCAL_FUSED_ROLLOUT=0)")
    ap.add_argument("--data-items", type=int, default=64, help="images decoded per data-pipeline repetition")
    ap.add_argument("--quick", action="store_true",
                    help="inference only, one process, a few minutes: DCAL / timm and SA-only / timm at 448 (DeiT-T, "
                         "DeiT-S; batch 1, 8, 32) and Re-ID 256x128 (DeiT-S, batch 32), medians of --reps "
                         "interleaved rounds, and where the time goes per part")
    ap.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the report as markdown here")
    args = ap.parse_args(argv)
    args.infer_reps = 3 * args.reps if args.infer_reps is None else args.infer_reps
    problem = check_device(args.device)
    if problem:
        ap.error(problem)  # exit status 2, the reason on stderr, nothing measured

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.no_fused_rollout:
        os.environ["DCAL_FUSED_ROLLOUT"] = "0"  # inherited by the variants' spawned processes
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    machine = machine_info(args.threads, args.device)
    started, load_before = time.time(), _loadavg()
    if args.quick:
        return run_quick(args, command, machine, QUICK, log)
    results: dict[str, Any] = {"command": command.strip(), "machine": machine, "cases": {}}
    sections = []
    for name in args.cases:
        case = CASES[name]
        if args.batch:
            case = replace(case, batch=args.batch)
        if args.infer_batches:
            case = replace(case, infer_batches=tuple(args.infer_batches))
        if args.img_size:
            size = tuple(args.img_size) * (2 if len(args.img_size) == 1 else 1)
            case = replace(case, img_size=size[:2])
        log(f"[{name}] counting FLOPs …")
        flops = {"train": {v: forward_flops(case, v, True) for v in case.train_variants},
                 "infer": {v: forward_flops(case, v, False) for v in case.infer_variants}}
        log(f"[{name}] timing {len(set(case.train_variants + case.infer_variants))} variants, "
            f"{args.warmup} warm-up + {args.reps} timed rounds (inference: {args.infer_reps}) …")
        raw = measure_case(case, args.reps, args.warmup, args.threads, log, args.device, args.infer_reps)
        data = None
        if case.data:
            log(f"[{name}] data pipeline …")
            data = measure_data(case, args.data_items, max(args.reps, 1))
        summary = summarise(case, raw, flops)
        results["cases"][name] = {"case": asdict(case), "flops_forward_per_image": flops, "raw": raw,
                                  "summary": summary, "data_pipeline": data}
        sections.append(format_case(case, summary, data))
    elapsed = time.time() - started
    results["elapsed_s"] = elapsed
    results["load_average"] = {"before": load_before, "after": _loadavg()}
    gpu = (f"GPU: {machine['gpu']} ({machine['gpu_memory_gb']} GB, CUDA {machine['cuda']}), bf16 autocast; "
           if args.device == "cuda" else "")
    memory = ("Peak train memory = peak CUDA allocation (`torch.cuda.max_memory_allocated`) during the training "
              "steps minus the allocation once model and AdamW were built" if args.device == "cuda" else
              "Peak train memory = ru_maxrss after the training steps minus ru_maxrss once model and AdamW were "
              "built (activations, gradients, optimizer state, temporaries, allocator high-water)")
    header = [
        f"Machine: {gpu}{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"(`torch.set_num_threads({args.threads})`), timm {machine['timm']}, Python {machine['python']}"
        + (f", rollout: {machine['rollout']}" if "rollout" in machine else "") + "; "
        f"load average before/after: {load_before} / {_loadavg()}; run took {elapsed / 60:.1f} min.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Medians of {args.reps} training and {args.infer_reps} inference repetitions after {args.warmup} warm-up, "
        "variants interleaved round-robin, "
        f"each in its own process. {memory}; "
        "saved for backward = distinct storages autograd keeps after one training forward. FLOP ratio = counted "
        "forward FLOPs of the same pair with attention explicit (training: train-mode forward incl. PWCA, x3).",
    ]
    report = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    print(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(report)
    return results


def run_quick(args: argparse.Namespace, command: str, machine: dict[str, Any], settings: tuple[QuickSetting, ...],
              log: Any) -> dict[str, Any]:
    """``--quick``: :func:`quick`'s tables with the machine line; written where ``--json`` / ``--markdown`` say."""
    if args.device != "cpu":
        raise SystemExit("--quick measures the CPU (run the full benchmark with --device cuda on a GPU)")
    started, load_before = time.time(), _loadavg()
    rows = quick(settings, args.reps, log)
    elapsed = time.time() - started
    report = (f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
              f"(`torch.set_num_threads({args.threads})`), timm {machine['timm']}, rollout: {machine['rollout']}; "
              f"load average before/after: {load_before} / {_loadavg()}; run took {elapsed / 60:.1f} min.\n\n"
              f"Command: `{command.strip()}`\n\n" + format_quick(rows, args.reps) + "\n")
    print(report)
    results = {"command": command.strip(), "machine": machine, "quick": rows, "elapsed_s": elapsed}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(report)
    return results


if __name__ == "__main__":
    main()
