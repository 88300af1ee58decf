"""One training epoch (DeiT's ``engine.train_one_epoch`` shape): batches in, optimizer steps out.

Rank handling, checkpoint I/O and logging stay at the edges: the caller hands in a ``step`` module (the model +
loss, DDP-wrapped under torchrun) and an ``on_step`` hook (mid-epoch checkpoints, log lines); the loop itself
only trains and counts. What it counts lives in :class:`EpochProgress`, which a mid-epoch checkpoint saves so
that a resumed epoch ends with the same record as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from dcal.data.robust import LoadedBatch, check_bad_fraction
from dcal.distributed import all_agree, all_reduce_sum
from dcal.engine.build import ForwardLoss
from dcal.losses import DCALLoss

MAX_BAD_EXAMPLES = 20  # bad file names kept per epoch for the error message


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN/inf for ``train.max_bad_steps`` steps in a row (none of them was applied)."""


@dataclass
class EpochProgress:
    """Where an epoch stands: its position (``batches`` drawn) and what it has counted so far (plain values, so
    it travels in a weights_only checkpoint)."""

    batches: int = 0  # batches drawn from the loader, skipped ones included: the sampler position
    steps: int = 0  # optimizer steps applied
    seen: int = 0  # images trained on
    sums: dict[str, float] = field(default_factory=dict)  # running sums of the losses over applied steps
    bad_images: int = 0
    bad_examples: list[str] = field(default_factory=list)
    read_images: int = 0  # good + bad
    bad_steps: int = 0  # non-finite losses (not applied)
    bad_in_a_row: int = 0
    skipped_batches: int = 0  # batches left with fewer than 2 readable images
    elapsed: float = 0.0  # seconds of training in this epoch (across a resume)
    weights: dict[str, float] = field(default_factory=dict)  # loss weights after the last applied step

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unpack_batch(batch: Any) -> tuple[Any, list[tuple[str, str]]]:
    """(data or None, bad files) of a ``LoadedBatch`` or of a plain ``(images, targets, ...)`` batch."""
    if isinstance(batch, LoadedBatch):
        return batch.data, batch.bad
    return batch, []


def epoch_stats(progress: EpochProgress, device: torch.device) -> dict[str, float]:
    """The epoch's record over all processes: mean losses, weights, counts, throughput."""
    keys = sorted(progress.sums)
    totals = all_reduce_sum([progress.sums[k] for k in keys] + [progress.steps, progress.seen, progress.bad_images,
                            progress.bad_steps, progress.skipped_batches], device)
    sums, (steps, seen, bad_images, bad_steps, skipped) = totals[: len(keys)], totals[len(keys):]
    stats: dict[str, float] = {k: s / steps for k, s in zip(keys, sums, strict=True)} if steps else {}
    stats.update({f"weight_{b}": w for b, w in progress.weights.items()})
    stats["images_per_s"] = seen / max(progress.elapsed, 1e-9)
    stats.update(bad_images=int(bad_images), bad_steps=int(bad_steps), skipped_batches=int(skipped))
    return stats


def train_one_epoch(
    model: nn.Module,
    criterion: DCALLoss,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: DictConfig,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    forward: nn.Module | None = None,
    *,
    step: nn.Module | None = None,
    progress: EpochProgress | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
    show_bar: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean losses, loss weights, last lr, throughput and bad-input counts.

    ``step`` is the (DDP-wrapped) :class:`ForwardLoss`; by default one is built around ``forward or model``.
    ``progress`` continues an epoch resumed mid-way (the loader then starts at ``progress.batches``).
    ``on_step(progress)`` runs after every batch, on every process.

    Bad input: unreadable images were left out of the batch by the loader (``LoadedBatch.bad``): each is warned
    about by name and counted; when more than half of the images read are bad (mid-epoch: of at least
    ``MIN_IMAGES_TO_JUDGE``; at its end: of the epoch) the epoch stops with ``BadImageError``. A batch
    left with fewer than 2 images (PWCA needs a partner) is skipped on every process. A non-finite loss is not
    applied (all processes agree on it); ``train.max_bad_steps`` of them in a row raise
    :class:`NonFiniteLossError` naming epoch and step. The lr schedule follows the batch position either way.
    """
    model.train()
    criterion.train()
    step = step or ForwardLoss(forward or model, criterion, cfg, device)
    progress = progress or EpochProgress()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
               disable=not (show_bar and sys.stderr.isatty()), initial=progress.batches,
               total=progress.batches + len(loader))  # type: ignore[arg-type]
    last = time.perf_counter()
    for batch in bar:
        data, bad = unpack_batch(batch)
        progress.batches += 1
        n_good = 0 if data is None else int(data[0].shape[0])
        progress.read_images += n_good + len(bad)
        for path, reason in bad:
            warnings.warn(f"skipped unreadable image {path} ({reason})", stacklevel=1)
            progress.bad_images += 1
            if len(progress.bad_examples) < MAX_BAD_EXAMPLES:
                progress.bad_examples.append(path)
        check_bad_fraction(progress.bad_images, progress.read_images, progress.bad_examples, "training")
        if not all_agree(n_good >= 2, device):
            progress.skipped_batches += 1
        else:
            images, targets = data[0].to(device, non_blocking=True), data[1].to(device, non_blocking=True)
            res = step(images, targets)
            finite = all_agree(bool(torch.isfinite(res.total)), device)
            optimizer.zero_grad(set_to_none=True)
            # backward runs even for a non-finite loss: DDP expects every forward to be followed by a backward
            (scaler.scale(res.total) if scaler is not None else res.total).backward()
            if finite:
                _apply(optimizer, scaler, model, cfg.train.clip_grad)
                progress.bad_in_a_row = 0
                progress.steps += 1
                progress.seen += n_good
                values = {"loss": res.total.item(), **{f"loss_{b}": v.item() for b, v in res.per_branch.items()}}
                for k, v in values.items():
                    progress.sums[k] = progress.sums.get(k, 0.0) + v
                progress.weights = dict(res.weights)
            else:
                optimizer.zero_grad(set_to_none=True)
                progress.bad_steps += 1
                progress.bad_in_a_row += 1
                where = f"epoch {epoch + 1}, step {progress.batches}"
                if progress.bad_in_a_row >= cfg.train.max_bad_steps:
                    raise NonFiniteLossError(
                        f"the loss was non-finite for {progress.bad_in_a_row} steps in a row (last at {where}); "
                        "none of them was applied. Set train.clip_grad or train.amp=none and continue with "
                        "--resume, or lower train.lr and start again (the lr schedule is part of the checkpoint)"
                    )
                warnings.warn(f"non-finite loss at {where}: step not applied", stacklevel=1)
        scheduler.step()
        now = time.perf_counter()
        progress.elapsed += now - last
        last = now
        if progress.steps:
            bar.set_postfix(loss=f"{progress.sums['loss'] / progress.steps:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{progress.seen / progress.elapsed:.1f}")
        if on_step is not None:
            on_step(progress)
            last = time.perf_counter()  # checkpoint time is not training time
    bar.close()
    check_bad_fraction(progress.bad_images, progress.read_images, progress.bad_examples, "training", min_seen=1)
    if progress.steps == 0:
        raise ValueError(f"epoch {epoch + 1} applied no optimizer step (empty loader, or every batch skipped)")
    stats = epoch_stats(progress, device)
    stats["lr"] = optimizer.param_groups[0]["lr"]
    return stats


def _apply(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, model: nn.Module,
           clip_grad: float | None) -> None:
    """Clip the model's gradients (after unscaling) and step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
