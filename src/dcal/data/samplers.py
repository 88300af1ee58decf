"""Identity-balanced sampling for re-id training (P identities x K instances per batch).

Use with a DataLoader whose ``batch_size`` equals the sampler's ``batch_size`` and ``drop_last=True``, and
no ``shuffle``::

    sampler = RandomIdentitySampler(train.pids, batch_size=64, num_instances=4, seed=cfg.seed)
    loader = DataLoader(train, batch_size=64, sampler=sampler, drop_last=True, num_workers=8)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, pids, camids in loader: ...

Every consecutive run of ``batch_size`` indices is one batch of P = batch_size // num_instances distinct
identities with K = num_instances images each (consecutive within the batch, identity by identity), which is
what batch-hard triplet mining expects.

Both training samplers resume mid-epoch: ``set_epoch(epoch, start_batch=k)`` yields the epoch's order from its
``k``-th batch on, so a run resumed from a mid-epoch checkpoint skips exactly the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler", "ShardedShuffleSampler", "ShardSampler"]

EPOCH_LENGTHS = ("images", "identities")


class RandomIdentitySampler(Sampler[int]):
    """P x K identity sampler (torchreid / TransReID ``RandomIdentitySampler``), deterministic and DDP-aware.

    Args:
        pids: the identity of each dataset item (e.g. ``dataset.pids``).
        batch_size: images per batch **on each process** (the DataLoader's ``batch_size``); a multiple of
            ``num_instances``. The paper's 64 = 16 x 4 on one GPU; on 4 GPUs pass 16 to keep 64 in all.
        num_instances: K, images per identity in a batch. Identities with fewer than K images are sampled
            with replacement (as the field does), those with more without replacement.
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)`` (see :meth:`set_epoch`).
        num_replicas, rank: DDP world size and rank; default from ``torch.distributed`` when it is
            initialised, else 1 and 0. Every rank draws the same global list of whole P x K batches and
            takes every ``num_replicas``-th one from ``rank`` on, after trimming the list to a multiple of
            ``num_replicas``: disjoint, equal-length shares. (If there are fewer batches than ranks, the
            list is repeated so that each rank still gets one batch; only then do shares overlap.)
        epoch_length: ``"images"`` (default): the torchreid/TransReID epoch. Each identity's images are
            shuffled and cut into chunks of K (an identity with fewer than K images gives one chunk drawn
            with replacement; the last incomplete chunk is dropped); batches pick P distinct identities at
            random among those with chunks left, until fewer than P remain. An epoch thus sees about every
            image once (Market-1501: ~200 batches of 64), and "120 epochs" means what it means in the
            paper's recipe. ``"identities"``: one epoch = every identity once, K images each
            (ceil(#ids / P) batches; the last batch is completed with identities not already in it).

    Raises:
        ValueError: ``batch_size`` not a multiple of ``num_instances``, fewer identities than P, bad option.
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int = 64,
        num_instances: int = 4,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        epoch_length: str = "images",
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})"
            )
        if epoch_length not in EPOCH_LENGTHS:
            raise ValueError(f"epoch_length must be one of {EPOCH_LENGTHS}, got {epoch_length!r}")
        num_replicas, rank = _dist_default(num_replicas, rank)
        pids_arr = np.asarray(pids.tolist() if isinstance(pids, torch.Tensor) else pids, dtype=np.int64)
        if pids_arr.ndim != 1 or pids_arr.size == 0:
            raise ValueError("pids must be a non-empty 1-D sequence of identities")
        self.batch_size = int(batch_size)
        self.num_instances = int(num_instances)
        self.num_pids_per_batch = self.batch_size // self.num_instances
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch_length = epoch_length
        self.epoch = 0
        # Group item indices by identity (stable, so each group is in dataset order).
        order = np.argsort(pids_arr, kind="stable")
        self.unique_pids, starts, counts = np.unique(pids_arr[order], return_index=True, return_counts=True)
        self._groups = np.split(order, starts[1:])
        self._counts = counts
        if len(self.unique_pids) < self.num_pids_per_batch:
            raise ValueError(
                f"{len(self.unique_pids)} identities (or classes) cannot fill a batch of P = {self.num_pids_per_batch} "
                f"distinct ones (batch_size {batch_size} / num_instances {num_instances})"
            )
        self._cache: tuple[int, np.ndarray] | None = None
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (call it before each epoch), from its
        ``start_batch``-th batch on (mid-epoch resume)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch]))

    def _draw(self, rng: np.random.Generator, group: np.ndarray, n: int) -> np.ndarray:
        """``n`` items of an identity: without replacement if it has enough, else with replacement."""
        if len(group) >= n:
            return rng.permutation(group)[:n] if n < len(group) else rng.permutation(group)
        return rng.choice(group, size=n, replace=True)

    def _global_batches_images(self, rng: np.random.Generator) -> np.ndarray:
        k, p = self.num_instances, self.num_pids_per_batch
        chunks: list[np.ndarray] = []  # per identity: (n_chunks, K)
        for group in self._groups:
            if len(group) < k:
                items = rng.choice(group, size=k, replace=True)
            else:
                items = rng.permutation(group)
                items = items[: len(items) // k * k]
            chunks.append(items.reshape(-1, k))
        left = np.array([len(c) for c in chunks])
        used = np.zeros(len(chunks), dtype=np.int64)
        avail = np.flatnonzero(left)
        batches = []
        while len(avail) >= p:
            chosen = rng.choice(avail, size=p, replace=False)
            batches.append(np.concatenate([chunks[i][used[i]] for i in chosen]))
            used[chosen] += 1
            if np.any(used[chosen] == left[chosen]):
                avail = np.flatnonzero(used < left)
        return np.stack(batches) if batches else np.empty((0, self.batch_size), dtype=np.int64)

    def _global_batches_identities(self, rng: np.random.Generator) -> np.ndarray:
        p, n_ids = self.num_pids_per_batch, len(self._groups)
        perm = rng.permutation(n_ids)
        rest = n_ids % p
        if rest:
            tail = perm[n_ids - rest:]
            others = rng.permutation(np.setdiff1d(np.arange(n_ids), tail))
            perm = np.concatenate([perm, others[: p - rest]])
        items = np.stack([self._draw(rng, self._groups[i], self.num_instances) for i in perm])
        return items.reshape(-1, self.batch_size)

    def batches(self) -> np.ndarray:
        """This rank's batches for the current epoch, shape ``(num_batches, batch_size)`` of item indices."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = self._rng()
        if self.epoch_length == "images":
            full = self._global_batches_images(rng)
        else:
            full = self._global_batches_identities(rng)
        r = self.num_replicas
        if len(full) < r:
            full = np.concatenate([full] * (-(-r // len(full))))
        full = full[: len(full) // r * r]
        mine = full[self.rank :: r].astype(np.int64, copy=False)
        self._cache = (self.epoch, mine)
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches()[self.start_batch :].reshape(-1).tolist())

    def __len__(self) -> int:
        return int(self.batches()[self.start_batch :].size)

    def __repr__(self) -> str:
        return (
            f"RandomIdentitySampler(ids={len(self.unique_pids)}, P={self.num_pids_per_batch}, "
            f"K={self.num_instances}, epoch_length={self.epoch_length!r}, rank={self.rank}/{self.num_replicas})"
        )


def _dist_default(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
    return int(num_replicas), int(rank)


class ShardedShuffleSampler(Sampler[int]):
    """Shuffled FGVC training order, sharded over DDP processes by global batch; resumable mid-epoch.

    Each epoch is a permutation of ``range(num_samples)`` that depends only on ``(seed, epoch)``, cut into
    global batches of ``num_replicas x batch_size`` (the incomplete tail is dropped: PWCA pairs images within
    a batch, so every batch must be full). Process ``rank`` takes the ``rank``-th slice of ``batch_size`` of
    each global batch, so N processes with batch B see, step by step, the same images as one process with
    batch N x B (what makes DDP training equal to large-batch training for per-sample losses).
    Use with ``DataLoader(batch_size=batch_size, sampler=..., drop_last=True)``.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        self.num_replicas, self.rank = _dist_default(num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.num_batches = self.num_samples // (self.batch_size * self.num_replicas)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches(self) -> torch.Tensor:
        """This process's batches for the current epoch, ``(num_batches, batch_size)`` item indices."""
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)[: self.num_batches * self.batch_size * self.num_replicas]
        return perm.view(self.num_batches, self.num_replicas, self.batch_size)[:, self.rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches()[self.start_batch :].reshape(-1).tolist())

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch) * self.batch_size


class ShardSampler(Sampler[int]):
    """Contiguous, unpadded share of ``range(num_samples)`` for process ``rank`` (evaluation): concatenating
    the shares in rank order gives the dataset order back, each sample exactly once."""

    def __init__(self, num_samples: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.num_replicas, self.rank = _dist_default(num_replicas, rank)
        self.start = num_samples * self.rank // self.num_replicas
        self.end = num_samples * (self.rank + 1) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
