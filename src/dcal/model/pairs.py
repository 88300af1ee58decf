"""Distractor pairing for PWCA (docs/design.md, Pairs): which image of the batch each image is paired with.

``random`` is the paper's default: a fresh random permutation of the batch with no fixed point (a uniform
random derangement, by rejection: on average e ≈ 2.7 draws of ``randperm``). The Table 4 ablations draw a
partner for each image independently: ``intra`` (same class), ``inter`` (other class) or ``mix`` (each image
intra or inter with probability 1/2). Images with no valid partner of the requested kind fall back to the
random derangement's partner, so every image always has a distractor other than itself: with many classes and
random batches an ``intra`` run gets far fewer same-class pairs than it asks for (:func:`pair_shortfall`; training
records the share it got, ``pwca_same_class``); ``train.sampler=pk`` batches give every image same-class partners.
``noise`` pairs are not drawn here: the PWCA blocks replace the distractor's keys/values with noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcal.vocabulary import PAIR_STRATEGIES


def random_derangement(n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError(f"PWCA pairs each image with another one of the batch: batch size must be >= 2, got {n}")
    ar = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == ar).any()):
            return perm.to(device)


def sample_pairs(
    strategy: str,
    batch_size: int,
    targets: Tensor | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Index tensor ``pairs`` (B,) such that image i is paired with image ``pairs[i]`` (never itself)."""
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; expected one of {PAIR_STRATEGIES}")
    base = random_derangement(batch_size, device, generator)
    if strategy in ("random", "noise"):
        return base
    if targets is None:
        raise ValueError(f"pair strategy {strategy!r} needs the batch's class targets: call model(images, targets=...)")
    targets = targets.to(device)
    same = targets[:, None] == targets[None, :]
    if strategy == "intra":
        want_same = torch.ones(batch_size, dtype=torch.bool, device=device)
    elif strategy == "inter":
        want_same = torch.zeros(batch_size, dtype=torch.bool, device=device)
    else:  # mix: intra or inter with equal probability per image
        want_same = torch.rand(batch_size, generator=generator).to(device) < 0.5
    valid = (same == want_same[:, None]) & ~torch.eye(batch_size, dtype=torch.bool, device=device)
    # A uniformly random valid partner per row: argmax of random scores restricted to valid entries.
    scores = torch.rand(batch_size, batch_size, generator=generator).to(device).masked_fill(~valid, -1.0)
    choice = scores.argmax(dim=1)
    return torch.where(valid.any(dim=1), choice, base)


SAME_CLASS_SHARE = {"intra": 100.0, "inter": 0.0, "mix": 50.0}  # % of same-class pairs each strategy asks for


def pair_shortfall(strategy: str, same_class_share: float, batch_size: int, tolerance: float = 10.0) -> str | None:
    """A one-line warning where an epoch's share of same-class pairs (%) is more than ``tolerance`` points from what
    ``strategy`` asks for (the batches lacked partners of the requested kind), else None."""
    want = SAME_CLASS_SHARE.get(strategy)
    if want is None or abs(same_class_share - want) <= tolerance:
        return None
    return (f"model.pair_strategy={strategy} asks for {want:.0f}% same-class PWCA pairs but got "
            f"{same_class_share:.1f}% in this epoch: an image with no partner of the requested kind in its batch "
            f"of {batch_size} keeps a random one (train.sampler=pk gives each image train.num_instances - 1 "
            "same-class partners)")
