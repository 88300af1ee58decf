"""Attention rollout (paper Eq. 2, Abnar & Zuidema 2020) and top-R local query selection.

Only the first (CLS) row of Ŝ_L = S̄_L S̄_(L-1) … S̄_1 is needed, with S̄_i = 0.5 S_i + 0.5 I. It is computed as a
row vector pushed through the layers from L down to 1: r ← r S̄_i = 0.5 (r S_i) + 0.5 r, which costs O(L N²)
per image instead of the O(L N³) of the matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def rollout_cls_row(attentions: Sequence[Tensor]) -> Tensor:
    """CLS row of the attention rollout.

    Args:
        attentions: head-averaged attention probabilities S_1 … S_L of the SA blocks in forward order,
            each (B, T, T) with the CLS token first. Layer L may also be given as its CLS row only (B, T).
            Any indexable sequence: items are read once each, last first.

    Returns:
        (B, T): the first row of Ŝ_L, a probability vector over CLS and the patch tokens.
    """
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    last = attentions[-1]
    row = last if last.dim() == 2 else last[:, 0]  # e₀ᵀ S_L
    row = 0.5 * row
    row[:, 0] += 0.5  # e₀ᵀ S̄_L = 0.5 e₀ᵀ S_L + 0.5 e₀ᵀ
    # By index, from L-1 down: a lazy sequence (DCAL's training path) then computes one map at a time.
    for i in range(len(attentions) - 2, -1, -1):
        row = 0.5 * torch.bmm(row.unsqueeze(1), attentions[i]).squeeze(1) + 0.5 * row
    return row


def num_local_queries(top_r: float, num_patches: int) -> int:
    """⌈R·N⌉ patch tokens, at least one; a tiny tolerance keeps float noise (0.1·30 = 3.0000000000000004) exact."""
    if not 0.0 < top_r <= 1.0:
        raise ValueError(f"top_r must be in (0, 1], got {top_r}")
    return max(1, min(num_patches, math.ceil(top_r * num_patches - 1e-9)))


def select_top(scores: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k highest scores per row, highest first (ties: lowest index first)."""
    return torch.topk(scores, k, dim=1, sorted=True).indices
