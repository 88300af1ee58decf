"""One training epoch (DeiT's ``engine.train_one_epoch`` shape): batches in, optimizer steps out.

Rank handling, checkpoint I/O and logging stay at the edges: the caller hands in a ``step`` module (the model +
loss, DDP-wrapped under torchrun) and an ``on_step`` hook (mid-epoch checkpoints, log lines); the loop itself
only trains and counts. What it counts lives in :class:`EpochProgress`, which a mid-epoch checkpoint saves so
that a resumed epoch ends with the same record as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from dcal.data.robust import LoadedBatch, check_bad_fraction
from dcal.distributed import all_agree, all_reduce_sum
from dcal.engine.build import ForwardLoss

if TYPE_CHECKING:
    from dcal.engine.state import TrainState

logger = logging.getLogger(__name__)
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
    correct: int = 0  # of those, the ones the SA branch classified right (as trained: augmented, drop-path on)
    paired: int = 0  # of those, the ones trained with a PWCA distractor image (not noise)
    same_class_pairs: int = 0  # of those, the ones whose distractor was of their own class
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

    def count_read(self, n_good: int, bad: list[tuple[str, str]]) -> None:
        """A batch drawn: ``n_good`` images read and the ``(path, reason)`` of those that could not be (each
        warned about); stops the epoch when the images look broken (``check_bad_fraction``)."""
        self.batches += 1
        self.read_images += n_good + len(bad)
        for path, reason in bad:
            logger.warning("skipped unreadable image %s (%s)", path, reason)
            self.bad_images += 1
            if len(self.bad_examples) < MAX_BAD_EXAMPLES:
                self.bad_examples.append(path)
        check_bad_fraction(self.bad_images, self.read_images, self.bad_examples, "training")

    def count_applied(self, seen: int, losses: dict[str, float], weights: dict[str, float], correct: int = 0,
                      same_class_pairs: int | None = None) -> None:
        """An optimizer step applied on ``seen`` images (``correct`` of them classified right by the SA branch,
        ``same_class_pairs`` paired with a distractor of their own class) with these losses and loss weights."""
        self.bad_in_a_row = 0
        self.steps += 1
        self.seen += seen
        self.correct += correct
        if same_class_pairs is not None:
            self.paired += seen
            self.same_class_pairs += same_class_pairs
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.weights = weights

    def count_not_applied(self, where: str, max_bad_steps: int) -> None:
        """A non-finite loss at ``where``, not applied: a warning, or :class:`NonFiniteLossError` once
        ``max_bad_steps`` came in a row."""
        self.bad_steps += 1
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= max_bad_steps:
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.bad_in_a_row} steps in a row (last at {where}); "
                "none of them was applied. Set train.clip_grad or train.amp=none and continue with "
                "--resume, or lower train.lr and start again (the lr schedule is part of the checkpoint)"
            )
        logger.warning("non-finite loss at %s: step not applied", where)


def unpack_batch(batch: Any) -> tuple[Any, list[tuple[str, str]]]:
    """(data or None, bad files) of a ``LoadedBatch`` or of a plain ``(images, targets, ...)`` batch."""
    if isinstance(batch, LoadedBatch):
        return batch.data, batch.bad
    return batch, []


def epoch_stats(progress: EpochProgress, device: torch.device) -> dict[str, float]:
    """The epoch's record over all processes: mean losses, weights, counts, throughput."""
    keys = sorted(progress.sums)
    totals = all_reduce_sum([progress.sums[k] for k in keys] + [progress.steps, progress.seen, progress.correct,
                            progress.paired, progress.same_class_pairs, progress.bad_images, progress.bad_steps,
                            progress.skipped_batches], device)
    sums, (steps, seen, correct, paired, same, bad_images, bad_steps, skipped) = totals[: len(keys)], totals[len(keys):]
    stats: dict[str, float] = {k: s / steps for k, s in zip(keys, sums, strict=True)} if steps else {}
    if seen:
        stats["train_top1"] = 100.0 * correct / seen  # running, on the augmented training batches
    if paired:
        stats["pwca_same_class"] = 100.0 * same / paired  # what model.pair_strategy got, not what it asked for
    stats.update({f"weight_{b}": w for b, w in progress.weights.items()})
    stats["images_per_s"] = seen / max(progress.elapsed, 1e-9)
    stats.update(bad_images=int(bad_images), bad_steps=int(bad_steps), skipped_batches=int(skipped))
    return stats


def train_one_epoch(
    state: TrainState,
    loader: Iterable,
    device: torch.device,
    cfg: DictConfig,
    epoch: int,
    *,
    step: nn.Module | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
    show_bar: bool = True,
) -> dict[str, float]:
    """One pass over ``loader`` training ``state``; returns mean losses, loss weights, last lr, throughput and
    bad-input counts.

    ``state.epoch`` becomes ``epoch`` and ``state.progress`` its position: a set ``state.progress`` continues an
    epoch resumed mid-way (the loader then starts at ``progress.batches``), so that a checkpoint of ``state``
    taken in ``on_step(progress)`` (after every batch, on every process) holds where the epoch stands.
    ``step`` is the (DDP-wrapped) :class:`ForwardLoss`; by default one is built around ``state.model``.

    Bad input: unreadable images were left out of the batch by the loader (``LoadedBatch.bad``): each is warned
    about by name and counted; when more than half of the images read are bad (mid-epoch: of at least
    ``MIN_IMAGES_TO_JUDGE``; at its end: of the epoch) the epoch stops with ``BadImageError``. A batch
    left with fewer than 2 images (PWCA needs a partner) is skipped on every process. A non-finite loss is not
    applied (all processes agree on it); ``train.max_bad_steps`` of them in a row raise
    :class:`NonFiniteLossError` naming epoch and step. The lr schedule follows the batch position either way.
    """
    optimizer, scheduler = state.optimizer, state.scheduler
    state.model.train()
    state.criterion.train()
    step = step or ForwardLoss(state.model, state.criterion, cfg, device)
    state.epoch, state.progress = epoch, state.progress or EpochProgress()
    progress = state.progress
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
               disable=not (show_bar and sys.stderr.isatty()), initial=progress.batches,
               total=progress.batches + len(loader))  # type: ignore[arg-type]
    last = time.perf_counter()
    for batch in bar:
        data, bad = unpack_batch(batch)
        n_good = 0 if data is None else int(data[0].shape[0])
        progress.count_read(n_good, bad)
        if not all_agree(n_good >= 2, device):
            progress.skipped_batches += 1
        else:
            _optimizer_step(state, progress, step, data, device, cfg, f"epoch {epoch + 1}, step {progress.batches}")
        if progress.steps:
            scheduler.step()
        else:  # only before this epoch's first applied step can PyTorch's first-step check fire
            with warnings.catch_warnings():
                # the schedule follows the batch position by design: a skipped first batch (or a non-finite first
                # loss) steps the scheduler before any optimizer step, which PyTorch warns about as if it were a bug
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
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


def _optimizer_step(state: TrainState, progress: EpochProgress, step: nn.Module, data: Any, device: torch.device,
                    cfg: DictConfig, where: str) -> None:
    """One optimizer step on a batch, counted in ``progress``; a non-finite loss is not applied."""
    optimizer, scaler = state.optimizer, state.scaler
    images, targets = data[0].to(device, non_blocking=True), data[1].to(device, non_blocking=True)
    res = step(images, targets)
    finite = all_agree(bool(torch.isfinite(res.total)), device)
    optimizer.zero_grad(set_to_none=True)
    # backward runs even for a non-finite loss: DDP expects every forward to be followed by a backward
    (scaler.scale(res.total) if scaler is not None else res.total).backward()
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        progress.count_not_applied(where, cfg.train.max_bad_steps)
        return
    _apply(optimizer, scaler, state.model, cfg.train.clip_grad)
    progress.count_applied(int(images.shape[0]), {"loss": res.total.item(),
                                                  **{f"loss_{b}": v.item() for b, v in res.per_branch.items()}},
                           dict(res.weights), res.sa_correct, res.same_class_pairs)


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
