"""Distributed data parallel on PyTorch's own engine (``torchrun``); no launcher of our own.

``torchrun --nproc_per_node=N -m dcal train ...`` starts N processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (or a c10d rendezvous for ``--nnodes``). :func:`init` reads
them and joins the process group: NCCL when the processes train on GPUs, gloo on the CPU. Without these
variables everything here degrades to one process (rank 0 of 1) and every collective is the identity, so the
engine calls the same functions in both cases (DeiT's ``utils.init_distributed_mode`` shape).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, number of processes, rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init() created the process group: shutdown(info) destroys it, a caller's group stays

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and checkpoints; the others only compute."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` / ``python -m torch.distributed.run``."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def env_world_size() -> int:
    """Number of processes of this run as torchrun announces it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def pick_device(want: str | torch.device | None = "auto", key: str = "train.device") -> torch.device:
    """The device named by ``want`` (``auto``/None: CUDA when available, else the CPU), checked to exist here, so
    that a missing GPU is one line naming ``key`` rather than a failure deep in the first ``.to()``."""
    if want is None or str(want) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{key}={want}: not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={want} but no CUDA device is available (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{key}={want} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}={want} but no MPS device is available (use cpu)")
    return dev


def init(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (if any) and pick this process's device.

    ``device`` is ``train.device`` (auto | cpu | cuda). Under torchrun with CUDA, process ``LOCAL_RANK`` uses
    GPU ``LOCAL_RANK`` and NCCL; on the CPU, gloo. A second call joins the same group without owning it.
    """
    pick_device(device, "train.device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not launched_by_torchrun():
        return DistInfo(), torch.device("cuda" if use_cuda else "cpu")
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPU(s) on this machine: "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    else:
        dev = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        info = replace(info, owns_group=True)
    return info, dev


def shutdown(info: DistInfo) -> None:
    """Destroy the process group where :func:`init` created it (``info.owns_group``); a caller's own group stays."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (one collective for the whole list)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_agree(flag: bool, device: torch.device) -> bool:
    """True iff ``flag`` is true on every process (so that all take the same branch)."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each process's ``t`` (same trailing shape, any number of rows) in rank order.

    Rows are padded to the largest count for the collective and trimmed after, so shards of unequal size
    (the last one of an evaluation set) come back exactly.
    """
    if not _active():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or the exception it raised, to every process.

    Used for checks of the output directory: one process looks, all agree (and all fail together).
    """
    result: tuple[bool, Any] = (True, None)
    if not _active() or dist.get_rank() == 0:
        try:
            result = (True, fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result = (False, e)
    ok, value = broadcast_object(result)
    if not ok:
        raise value
    return value


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``module`` when there are several processes; else ``module``.

    ``sync_bn`` converts every BatchNorm (the Re-ID BNNecks) to SyncBatchNorm first, so that batch statistics
    are those of the global batch.
    """
    if not info.enabled:
        return module
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("train.sync_bn=true needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)
