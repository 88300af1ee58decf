"""Attention rollout (paper Eq. 2, Abnar & Zuidema 2020) and top-R local query selection.

Only the first (CLS) row of Ŝ_L = S̄_L S̄_(L-1) … S̄_1 is needed, with S̄_i = 0.5 S_i + 0.5 I. It is computed as a
row vector pushed through the layers from L down to 1: r ← r S̄_i = 0.5 (r S_i) + 0.5 r, which costs O(L N²)
per image instead of the O(L N³) of the matrix product.

Each S_i (the head-averaged attention probabilities of SA block i) is given either as an explicit (B, T, T) map
or as the block's queries and keys (:class:`QueryKey`). With queries and keys, r S_i is computed in tiles of
query rows, r S_i = mean_h Σ_t r_t softmax(q_t Kᵀ/√d), so the B·H·T² probabilities are never written to
memory: at FGVC resolution (T = 785) writing and re-reading them is what made DCAL inference memory-bound
(``benchmarks/README.md`` has the measurements).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Scores per tile (float32): 2^20 = 4 MiB, inside a server CPU's L3. Measured in benchmarks/bench_rollout.py:
# smaller tiles mean more, smaller kernel calls, and each call costs a thread hand-off that a loaded machine makes
# expensive; much larger tiles spill to memory (see benchmarks/README.md).
TILE_ELEMENTS = 2**20


@dataclass(frozen=True)
class QueryKey:
    """Queries and keys of one self-attention block: S = mean_h softmax(q kᵀ), without S itself.

    Attributes:
        q: (B, H, T, d) queries, already multiplied by the softmax scale (1/√d for timm).
        k: (B, H, T, d) keys.
        lse: optional (B, H, T) log-sum-exp of each row of q kᵀ, the softmax normalisers, when the forward's
            attention kernel returned them; then a tile's probabilities are exp(s − lse), one pass instead of a
            softmax's three.
    """

    q: Tensor
    k: Tensor
    lse: Tensor | None = None

    def cls_row(self) -> Tensor:
        """e₀ᵀ S, (B, T): the CLS query's attention averaged over heads."""
        return torch.softmax(self.q[:, :, :1].float() @ self.k.float().transpose(-2, -1), dim=-1)[:, :, 0].mean(1)

    def left_multiply(self, row: Tensor, tile_elements: int = TILE_ELEMENTS) -> Tensor:
        """row S, (B, T), for a row vector per image ``row`` (B, T), in tiles of query rows.

        Heads and images are flattened into one batch of n = B·H (T, d) problems; a tile is g of those problems
        times t query rows, g·t·T ≤ ``tile_elements`` scores: scores → softmax over keys (each row whole, so
        the softmax is exact; or exp(s − lse) with the forward's normalisers) → weighted by the tile's r_t and
        summed into the output (one ``baddbmm``).
        """
        B, H, T, d = self.q.shape
        n = B * H
        q = self.q.float().reshape(n, T, d)
        kt = self.k.float().reshape(n, T, d).transpose(1, 2)
        r = row.float().unsqueeze(1).expand(B, H, T).reshape(n, 1, T)
        lse = None if self.lse is None else self.lse.float().reshape(n, T, 1)
        t = max(1, min(T, tile_elements // T))  # query rows per tile
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # a traced graph (ONNX) must not bake the batch into its loop: tiles of query rows only, all images
            # and heads at once, summed out of place (T and so the tiles are fixed by the image size)
            out = sum(torch.bmm(r[:, :, s:s + t], torch.bmm(q[:, s:s + t], kt).softmax(dim=-1))
                      for s in range(0, T, t))
            return out.view(B, H, T).mean(dim=1)
        out = torch.zeros(n, 1, T, dtype=torch.float32, device=q.device)
        g = max(1, min(n, tile_elements // (t * T)))  # (image, head) problems per tile
        for a in range(0, n, g):  # ⌈n/g⌉·⌈T/t⌉ tiles: a few per image at T = 785
            b = min(a + g, n)
            for s in range(0, T, t):
                e = min(s + t, T)
                scores = torch.bmm(q[a:b, s:e], kt[a:b])
                probs = scores.softmax(dim=-1) if lse is None else scores.sub_(lse[a:b, s:e]).exp_()
                out[a:b].baddbmm_(r[a:b, :, s:e], probs)
        return out.view(B, H, T).mean(dim=1)


def cls_attention_row(attention: Tensor | QueryKey) -> Tensor:
    """e₀ᵀ S, (B, T), of one block's head-averaged attention given as a map, its CLS row or a :class:`QueryKey`."""
    if isinstance(attention, QueryKey):
        return attention.cls_row()
    return attention if attention.dim() == 2 else attention[:, 0]


def _left_multiply(row: Tensor, attention: Tensor | QueryKey) -> Tensor:
    if isinstance(attention, QueryKey):
        return attention.left_multiply(row)
    return torch.bmm(row.unsqueeze(1), attention.to(row.dtype)).squeeze(1)


def rollout_cls_row(attentions: Sequence[Tensor | QueryKey]) -> Tensor:
    """CLS row of the attention rollout.

    Args:
        attentions: S_1 … S_L of the SA blocks in forward order, CLS token first, each either the head-averaged
            probabilities (B, T, T) or a :class:`QueryKey`. Layer L may also be given as its CLS row only (B, T).
            Any indexable sequence: items are read once each, last first.

    Returns:
        (B, T) float32: the first row of Ŝ_L, a probability vector over CLS and the patch tokens.
    """
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    last = attentions[-1]
    # float32 even under autocast: the rollout decides which patches GLCA sees, bf16 scores would reorder them
    with torch.autocast(device_type=(last.q if isinstance(last, QueryKey) else last).device.type, enabled=False):
        row = 0.5 * cls_attention_row(last).float()
        row[:, 0] += 0.5  # e₀ᵀ S̄_L = 0.5 e₀ᵀ S_L + 0.5 e₀ᵀ
        # By index, from L-1 down: a lazy sequence (checkpointed training) then computes one block at a time.
        for i in range(len(attentions) - 2, -1, -1):
            row = 0.5 * _left_multiply(row, attentions[i]) + 0.5 * row
    return row


def num_local_queries(top_r: float, num_patches: int) -> int:
    """⌈R·N⌉ patch tokens, at least one; a tiny tolerance keeps float noise (0.1·30 = 3.0000000000000004) exact."""
    if not 0.0 < top_r <= 1.0:
        raise ValueError(f"top_r must be in (0, 1], got {top_r}")
    return max(1, min(num_patches, math.ceil(top_r * num_patches - 1e-9)))


def select_top(scores: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k highest scores per row, highest first (ties: lowest index first)."""
    return torch.topk(scores, k, dim=1, sorted=True).indices
