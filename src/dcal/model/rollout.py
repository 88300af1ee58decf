"""Attention rollout (paper Eq. 2, Abnar & Zuidema 2020) and top-R local query selection.

Only one row of Ŝ_L = S̄_L S̄_(L-1) … S̄_1 is needed, with S̄_i = 0.5 S_i + 0.5 I: the pooled feature's row r₀ Ŝ_L
(the CLS row for a class token). It is computed as a row vector pushed through the layers from L down to 1:
r ← r S̄_i = 0.5 (r S_i) + 0.5 r, which costs O(L T²) per image instead of the O(L T³) of the matrix product.

Each S_i (the head-averaged attention probabilities of SA block i) is given either as an explicit (B, T, T) map
or as the block's queries and keys (:class:`QueryKey`). With queries and keys, r S_i is computed in tiles of
query rows, r S_i = mean_h Σ_t r_t softmax(q_t Kᵀ/√d), so the B·H·T² probabilities are never written to
memory: at FGVC resolution (T = 785) writing and re-reading them is what made DCAL inference memory-bound
(``benchmarks/README.md`` has the measurements). On the CPU, with the forward's softmax normalisers, a compiled
kernel (:mod:`dcal.model.fused_rollout`) does the same per L2-sized chunk of query rows; the eager tiles here
are its fallback and the path everywhere else (CUDA, tracing, no normalisers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dcal.model import fused_rollout

# Scores per tile (float32): 2^20 = 4 MiB, inside a server CPU's L3: smaller tiles mean more kernel calls, larger
# ones spill to memory (benchmarks/README.md).
TILE_ELEMENTS = 2**20
# On a GPU a tile is a kernel launch or three, not cache: 2^26 scores (256 MiB) keep launches few (a guess: no GPU
# measurement yet).
GPU_TILE_ELEMENTS = 2**26
_LOG2E = 1.0 / math.log(2.0)


def default_tile_elements(device: torch.device) -> int:
    """Scores per rollout tile on ``device``: :data:`TILE_ELEMENTS` on the CPU, :data:`GPU_TILE_ELEMENTS` else."""
    return TILE_ELEMENTS if device.type == "cpu" else GPU_TILE_ELEMENTS


@dataclass(frozen=True)
class QueryKey:
    """Queries and keys of one self-attention block: S = mean_h softmax(scale · q kᵀ), without S itself.

    Attributes:
        q: (B, H, T, d) queries; any strides (a view into the block's qkv projection is fine).
        k: (B, H, T, d) keys; any strides.
        lse: optional (B, H, T) log-sum-exp of each row of scale · q kᵀ, the softmax normalisers, when the
            forward's attention kernel returned them; then a score tile's probabilities are exp(s − lse), one
            elementwise pass instead of a softmax's three.
        scale: the softmax scale (1/√d for timm), applied inside the score product.
    """

    q: Tensor
    k: Tensor
    lse: Tensor | None = None
    scale: float = 1.0

    def cls_row(self) -> Tensor:
        """e₀ᵀ S, (B, T): the CLS query's attention averaged over heads."""
        scores = (self.q[:, :, :1].float() * self.scale) @ self.k.float().transpose(-2, -1)
        return torch.softmax(scores, dim=-1)[:, :, 0].mean(1)

    def left_multiply(self, row: Tensor, tile_elements: int | None = None, buffer: Tensor | None = None,
                      fused: bool | None = None) -> Tensor:
        """row S, (B, T), for a row vector per image ``row`` (B, T), in tiles of query rows: no B·H·T² tensor.

        On the CPU with the forward's normalisers this runs the fused kernel (:mod:`dcal.model.fused_rollout`) when
        it is available; ``fused=False`` forces the eager tiles below, ``fused=True`` requires the kernel.
        ``tile_elements`` (default :func:`default_tile_elements`) and ``buffer`` (float32 scratch for the tiles,
        reused across calls: one rollout passes the same one to every block) concern the eager tiles only.

        An eager tile holds whole score rows: g (image, head) problems times t query rows, g·t·T ≤
        ``tile_elements``. With the normalisers its probabilities are one GEMM and an exp2 in place,
        2^(log₂e · (scale · q kᵀ − lse)) = exp(s − lse); without them (CUDA, attention dropout) a softmax over
        keys. A second GEMM adds the tile's rows weighted by r_t. A problem too large to share a tile runs on
        strided views of q and k (no copies); smaller ones are flattened into batches. Why each of these
        choices: ``benchmarks/README.md``, "Why DCAL costs what it costs".
        """
        B, H, T, d = self.q.shape
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if fused is None:
            fused = (self.lse is not None and self.q.device.type == "cpu" and not tracing
                     and fused_rollout.available())
        if fused:
            if self.lse is None:
                raise ValueError("the fused rollout kernel needs the forward's softmax normalisers (lse)")
            return fused_rollout.left_multiply(self.q, self.k, self.lse, row, self.scale)
        tile_elements = default_tile_elements(self.q.device) if tile_elements is None else tile_elements
        t = tile_rows(T, tile_elements)
        g = max(1, min(B * H, tile_elements // (t * T)))  # (image, head) problems per tile
        if tracing:
            # a traced graph (ONNX) must not bake the batch into its loop: tiles of query rows only, all images
            # and heads at once, summed out of place (T and so the tiles are fixed by the image size)
            q, kt, r = self._flat(row)
            out = sum(torch.bmm(r[:, :, s:s + t], (torch.bmm(q[:, s:s + t], kt) * self.scale).softmax(dim=-1))
                      for s in range(0, T, t))
            return out.view(B, H, T).mean(dim=1)
        scratch = _scratch(buffer, g * t * T, self.q.device)
        if self.lse is not None and g == 1:
            return self._left_multiply_per_problem(row, t, scratch)
        return self._left_multiply_batched(row, t, g, scratch)

    def _flat(self, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (n, T, d), kᵀ (n, d, T) and r (n, 1, T) over the n = B·H problems (q and k copied if strided)."""
        B, H, T, d = self.q.shape
        q = self.q.float().reshape(B * H, T, d)
        kt = self.k.float().reshape(B * H, T, d).transpose(1, 2)
        return q, kt, row.float().unsqueeze(1).expand(B, H, T).reshape(B * H, 1, T)

    def _left_multiply_per_problem(self, row: Tensor, t: int, scratch: Tensor) -> Tensor:
        B, H, T, _ = self.q.shape
        q, k, r = self.q.float(), self.k.float(), row.float()
        bias = self.lse.float() * -_LOG2E  # −log₂e · lse, per score row
        out = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
        tile = scratch.view(t, T)
        for b in range(B):
            for h in range(H):
                kt = k[b, h].t()
                for s in range(0, T, t):
                    e = min(s + t, T)
                    probs = torch.addmm(bias[b, h, s:e, None].expand(e - s, T), q[b, h, s:e], kt,
                                        alpha=self.scale * _LOG2E, out=tile[: e - s])
                    out[b, h].addmv_(probs.exp2_().t(), r[b, s:e])
        return out.mean(dim=1)

    def _left_multiply_batched(self, row: Tensor, t: int, g: int, scratch: Tensor) -> Tensor:
        B, H, T, _ = self.q.shape
        n = B * H
        q, kt, r = self._flat(row)
        if self.lse is not None:
            bias = (self.lse.float() * -_LOG2E).reshape(n, T, 1)
        out = torch.zeros(n, 1, T, dtype=torch.float32, device=q.device)
        for a in range(0, n, g):
            b = min(a + g, n)
            for s in range(0, T, t):
                e = min(s + t, T)
                tile = scratch[: (b - a) * (e - s) * T].view(b - a, e - s, T)
                if self.lse is None:
                    probs = torch.bmm(q[a:b, s:e], kt[a:b], out=tile).mul_(self.scale).softmax(dim=-1)
                else:
                    probs = torch.baddbmm(bias[a:b, s:e].expand(b - a, e - s, T), q[a:b, s:e], kt[a:b],
                                          alpha=self.scale * _LOG2E, out=tile).exp2_()
                out[a:b].baddbmm_(r[a:b, :, s:e], probs)
        return out.view(B, H, T).mean(dim=1)


def tile_rows(num_tokens: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Query rows per rollout tile: as many whole score rows as fit in ``tile_elements``, at least one."""
    return max(1, min(num_tokens, tile_elements // num_tokens))


def _scratch(buffer: Tensor | None, numel: int, device: torch.device) -> Tensor:
    """The first ``numel`` floats of ``buffer``, or a new tensor when it is missing, too small or elsewhere."""
    if buffer is None or buffer.numel() < numel or buffer.device != device or buffer.dtype != torch.float32:
        return torch.empty(numel, dtype=torch.float32, device=device)
    return buffer.view(-1)[:numel]


def cls_attention_row(attention: Tensor | QueryKey) -> Tensor:
    """e₀ᵀ S, (B, T), of one block's head-averaged attention given as a map, its CLS row or a :class:`QueryKey`."""
    if isinstance(attention, QueryKey):
        return attention.cls_row()
    return attention if attention.dim() == 2 else attention[:, 0]


def _left_multiply(row: Tensor, attention: Tensor | QueryKey, buffer: Tensor | None = None) -> Tensor:
    if isinstance(attention, QueryKey):
        return attention.left_multiply(row, buffer=buffer)
    return torch.bmm(row.unsqueeze(1), attention.to(row.dtype)).squeeze(1)


def _rollout_step(row: Tensor, attention: Tensor | QueryKey, buffer: Tensor | None = None) -> Tensor:
    """r S̄ = 0.5 r S + 0.5 r; with an explicit map one ``baddbmm`` (one pass over the map, no temporaries)."""
    if isinstance(attention, QueryKey):
        return 0.5 * attention.left_multiply(row, buffer=buffer) + 0.5 * row
    r = row.unsqueeze(1)
    return torch.baddbmm(r, r, attention.to(row.dtype), beta=0.5, alpha=0.5).squeeze(1)


def attention_row(attention: Tensor | QueryKey, start: Tensor | None = None) -> Tensor:
    """r₀ S of one block, (B, T): the class token's row (``start=None``) or the row vector ``start`` (B, T) times
    the head-averaged attention (the paper's "last layer only" selection, for any pooling)."""
    if start is None:
        return cls_attention_row(attention)
    return _left_multiply(start.float(), attention)


def rollout_row(attentions: Sequence[Tensor | QueryKey], start: Tensor | None = None) -> Tensor:
    """The pooled feature's row of the attention rollout (Eq. 2): r₀ Ŝ_L = r₀ S̄_L S̄_(L-1) … S̄_1.

    Args:
        attentions: S_1 … S_L of the SA blocks in forward order, each either the head-averaged probabilities
            (B, T, T) or a :class:`QueryKey`; with ``start=None`` layer L may also be given as its class-token row
            only (B, T). Any indexable sequence: items are read once each, last first.
        start: r₀ (B, T), how the pooled feature weighs the tokens of x_L: None for the class token (e₀, token
            pooling), the patches' uniform weights for average pooling, the pooling attention's probabilities
            for attention pooling (docs/design.md, "Backbones").

    Returns:
        (B, T) float32, a probability vector over all T tokens (prefix tokens first).
    """
    if not attentions:
        raise ValueError("rollout needs the attention of at least one block")
    last = attentions[-1]
    # float32 even under autocast: the rollout decides which patches GLCA sees, bf16 scores would reorder them
    with torch.autocast(device_type=(last.q if isinstance(last, QueryKey) else last).device.type, enabled=False):
        # one tile's scratch for all blocks' query/key tiles (untouched pages cost nothing until a tile uses them);
        # explicit maps need none
        device = (last.q if isinstance(last, QueryKey) else last).device
        buffer = (torch.empty(default_tile_elements(device), dtype=torch.float32, device=device)
                  if isinstance(last, QueryKey) else None)
        if start is None:
            row = 0.5 * cls_attention_row(last).float()
            row[:, 0] += 0.5  # e₀ᵀ S̄_L = 0.5 e₀ᵀ S_L + 0.5 e₀ᵀ
        else:
            row = _rollout_step(start.float(), last, buffer)
        # By index, from L-1 down: a lazy sequence (checkpointed training) then computes one block at a time.
        for i in range(len(attentions) - 2, -1, -1):
            row = _rollout_step(row, attentions[i], buffer)
    return row


def rollout_cls_row(attentions: Sequence[Tensor | QueryKey]) -> Tensor:
    """CLS row of the attention rollout: :func:`rollout_row` for a class-token (token-pooled) backbone."""
    return rollout_row(attentions)


def num_local_queries(top_r: float, num_patches: int) -> int:
    """⌈R·N⌉ patch tokens, at least one; a tiny tolerance keeps float noise (0.1·30 = 3.0000000000000004) exact."""
    if not 0.0 < top_r <= 1.0:
        raise ValueError(f"top_r must be in (0, 1], got {top_r}")
    return max(1, min(num_patches, math.ceil(top_r * num_patches - 1e-9)))


def select_top(scores: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k highest scores per row, highest first (ties: lowest index first)."""
    return torch.topk(scores, k, dim=1, sorted=True).indices
