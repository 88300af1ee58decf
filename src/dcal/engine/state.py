"""The training state: what a checkpoint (``last.pth``, ``best.pth``) saves and ``--resume`` restores.

:class:`TrainState` holds the model, loss module, optimizer, schedule and grad scaler with where the run stands
(epoch, position inside it, last record, best score). It saves and restores itself in the checkpoint format of
:func:`dcal.checkpoint.save_training_state` (version 2): the keys ``model``, ``criterion``, ``optimizer``,
``scheduler``, ``scaler``, ``epoch``, ``best``, ``best_epoch``, ``record``, ``rng_per_rank``, ``world_size``,
``progress_per_rank`` beside the run's ``config`` and ``extra`` (class names). Which process writes is the
caller's business (rank 0 passes the paths, the others none); gathering every process's RNG states and epoch
position is collective, so every process calls :meth:`TrainState.save` at the same points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from dcal import distributed as dist
from dcal.checkpoint import load_model_state, load_training_state, rng_state, save_training_state, set_rng_state
from dcal.engine.loop import EpochProgress

# what a final record takes over from the last epoch's record (the rest says where a checkpoint stood)
POSITION_KEYS = ("epoch", "step", "partial", "interrupted")


@dataclass
class TrainState:
    """Everything training changes, and where it stands.

    ``epoch`` is the last epoch finished, or the one in progress while ``progress`` (its position and running
    counts) is set; ``record`` is the last metrics record (an epoch's, or a mid-epoch ``partial`` one)."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    epoch: int = -1
    progress: EpochProgress | None = None
    record: dict[str, Any] = field(default_factory=dict)
    best: float = -math.inf
    best_epoch: int = -1

    @classmethod
    def from_config(cls, cfg: DictConfig, num_classes: int, steps_per_epoch: int, device: torch.device) -> TrainState:
        """A new run's state: model, loss, optimizer, per-step lr schedule and (``train.amp=fp16``) grad scaler."""
        from dcal.engine.build import build_criterion, build_model, build_optimizer, lr_factor
        from dcal.model.finetune import finetune_from_config

        if cfg.train.amp == "fp16" and device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device (use train.amp=bf16 on the CPU)")
        # frozen blocks / LoRA adapters before the optimizer sees the parameters and before a resume loads them
        model = finetune_from_config(build_model(cfg, num_classes), cfg.model).to(device)
        if cfg.train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        criterion = build_criterion(cfg, model).to(device)
        optimizer = build_optimizer(cfg, model, criterion)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
        scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None
        return cls(model, criterion, optimizer, scheduler, scaler)

    @property
    def start_epoch(self) -> int:
        """The epoch to train next (the one in progress when stopped mid-epoch)."""
        return self.epoch if self.progress is not None else self.epoch + 1

    @property
    def start_batch(self) -> int:
        """Batches of :attr:`start_epoch` already trained on (0 unless stopped mid-epoch)."""
        return self.progress.batches if self.progress is not None else 0

    def end_epoch(self, record: dict[str, Any], metric: str) -> bool:
        """Close the epoch in progress with its ``record``; True when it holds a new best ``metric``."""
        self.record, self.progress = record, None
        improved = metric in record and record[metric] > self.best
        if improved:
            self.best, self.best_epoch = record[metric], self.epoch
        return improved

    def final_record(self, epochs: int, metric: str, train_time_s: float) -> dict[str, Any]:
        """The record that ends a run of ``epochs`` epochs: best score and epoch, time, the last record's values."""
        return {"final": True, "epoch": epochs, f"best_{metric}": self.best, "best_epoch": self.best_epoch + 1,
                "train_time_s": train_time_s,
                **{k: v for k, v in self.record.items() if k not in POSITION_KEYS}}

    def state_dict(self) -> dict[str, Any]:
        """The state as checkpoint entries. Collective: every process's RNG states (and position) are gathered."""
        return {
            "model": self.model.state_dict(), "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "record": self.record,
            "rng_per_rank": (rngs := dist.gather_objects(rng_state())), "world_size": len(rngs),
            "progress_per_rank": dist.gather_objects(self.progress.as_dict()) if self.progress is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path, rank: int = 0, world_size: int = 1) -> None:
        """Restore a checkpoint's entries (``source`` names it in errors), this process's RNG states included.
        A mid-epoch checkpoint must be resumed by as many processes as wrote it (positions are per process)."""
        per_rank = state.get("progress_per_rank")
        if per_rank and len(per_rank) != world_size:
            raise ValueError(
                f"{source} was written mid-epoch by {len(per_rank)} process(es) and this run has {world_size}: "
                "resume with the same number of processes (the batches already seen are per-process shares)"
            )
        load_model_state(self.model, state["model"], source)
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        self.record = state.get("record") or {}
        self.progress = EpochProgress(**per_rank[rank]) if per_rank else None
        rngs = state.get("rng_per_rank") or [state["rng"]]  # version 1 kept the writer's states only
        set_rng_state(rngs[rank] if len(rngs) == world_size else rngs[0])

    def load(self, path: str | Path, rank: int = 0, world_size: int = 1) -> None:
        """Restore the checkpoint file ``path`` (read safely: :func:`dcal.checkpoint.load_training_state`)."""
        self.load_state_dict(load_training_state(path), path, rank, world_size)

    def save(self, paths: Sequence[Path], **meta: Any) -> None:
        """Write the state, with ``meta`` (``config``, ``extra``), atomically to each of ``paths`` in turn.
        Collective: every process calls it; only the one that writes passes paths."""
        state = self.state_dict()
        for path in paths:
            save_training_state(path, **state, **meta)
