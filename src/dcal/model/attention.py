"""Attention primitives on top of timm's ``Attention`` / ``Block`` modules.

DCAL needs three variants of one timm block, all sharing (or copying) its weights:

* self-attention that also returns the head-averaged probabilities (for the rollout of Eq. 2),
* global-local cross-attention (Eq. 3): a few query tokens against all keys/values,
* pair-wise cross-attention (Eq. 4): each image's queries against its own and a distractor's keys/values.

Each function reproduces timm's ``Block.forward`` exactly (pre-norm, layer scale, drop path, optional
attention-output norm and gate), so that with the same weights and inputs the outputs are those of timm.
Only :func:`sa_block_with_probs` materialises attention probabilities (the FLOP counter's path: torch's flop
counter does not see fused attention on the CPU, so :func:`explicit_attention` makes every attention explicit);
everywhere else attention runs in ``F.scaled_dot_product_attention`` (fused kernels), and the rollout gets each
SA block's queries and keys (:func:`sa_block_keep_qk`, :func:`sa_query_key`) instead of its probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor

from dcal.model.rollout import QueryKey

_FORCE_EXPLICIT = False


@contextlib.contextmanager
def explicit_attention() -> Iterator[None]:
    """Compute every attention as explicit matmul + softmax (for FLOP counting); restores on exit."""
    global _FORCE_EXPLICIT
    previous, _FORCE_EXPLICIT = _FORCE_EXPLICIT, True
    try:
        yield
    finally:
        _FORCE_EXPLICIT = previous


def check_block(block: torch.nn.Module, where: str) -> None:
    """Raise a clear error when a backbone block is not the standard pre-norm timm ``Block``."""
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise TypeError(
            f"{where}: DCAL needs timm's standard pre-norm vision_transformer.Block with Attention, "
            f"got {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}"
        )


def _heads(attn: Attention, x: Tensor) -> Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    B, T, _ = x.shape
    return x.reshape(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)


def qkv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of already-normed tokens ``x``, each (B, H, T, d), as timm computes them."""
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _project(attn: Attention, x: Tensor, part: slice) -> Tensor:
    """Rows ``part`` of the fused qkv projection applied to ``x``: (B, T, len(part))."""
    if type(attn.qkv) is not torch.nn.Linear:  # wrapped (LoRA adapters, dcal.model.finetune): its own forward
        return attn.qkv(x)[..., part]
    w, b = attn.qkv.weight, attn.qkv.bias
    return F.linear(x, w[part], None if b is None else b[part])


def q_and_kv(attn: Attention, x_query: Tensor, x_context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries from ``x_query`` and keys/values from ``x_context`` with the rows of one qkv projection.

    Slicing the fused weight avoids projecting queries for the context tokens that GLCA never uses.
    """
    dim = attn.attn_dim
    q = _project(attn, x_query, slice(0, dim))
    kv = _project(attn, x_context, slice(dim, 3 * dim))
    B, T, _ = x_context.shape
    k, v = kv.reshape(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(_heads(attn, q)), attn.k_norm(k), v


def _probs(attn: Attention, q: Tensor, k: Tensor) -> Tensor:
    """Attention probabilities softmax(q kᵀ / √d), (B, H, Tq, Tk)."""
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v with timm's attention dropout; fused unless :func:`explicit_attention`."""
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if not _FORCE_EXPLICIT:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return attn.attn_drop(_probs(attn, q, k)) @ v


def attend_with_lse(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """:func:`attend`, plus the (B, H, T) log-sum-exp of each score row where the fused kernel returns it.

    On the CPU ``F.scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``,
    which computes the softmax normalisers anyway; calling it directly gives the same output (bit for bit) and
    the normalisers, which the rollout then need not recompute. Elsewhere (CUDA, dropout, mixed dtypes,
    :func:`explicit_attention`) the normalisers are None and the rollout computes its own softmax; so too while
    tracing or exporting (ONNX has no such operator: the graph gets the standard attention).
    """
    dropout = attn.training and attn.attn_drop.p > 0
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if _FORCE_EXPLICIT or dropout or exporting or q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype:
        return attend(attn, q, k, v), None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)


def attn_output(attn: Attention, o: Tensor, x_query: Tensor) -> Tensor:
    """(B, H, T, d) attention result -> projected (B, T, D): timm's norm, optional gate, proj, dropout."""
    B, _, T, _ = o.shape
    o = attn.norm(o.transpose(1, 2).reshape(B, T, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(x_query).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _finish_block(block: Block, x: Tensor, attn_out: Tensor) -> Tensor:
    """Residual + MLP half of timm's ``Block.forward``."""
    x = x + block.drop_path1(block.ls1(attn_out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def explicit_attention_active() -> bool:
    """Whether :func:`explicit_attention` is in force."""
    return _FORCE_EXPLICIT


def sa_block_with_probs(block: Block, x: Tensor, cls_row_only: bool = False) -> tuple[Tensor, Tensor]:
    """timm ``Block.forward`` with explicit attention, also returning head-averaged probabilities.

    Returns the block output (B, T, D) and the detached attention S averaged over heads (B, T, T), the input
    of the rollout (Eq. 2), or only its CLS row (B, T) with ``cls_row_only``. Dropout on attention applies to
    the output only, not to S. One softmax serves output and S: the path for FLOP counting
    (:func:`explicit_attention`); inference and training use :func:`sa_block_keep_qk` (see ``DCAL._sa_stream``).
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h)
    probs = _probs(attn, q, k)
    o = attn.attn_drop(probs) @ v
    probs = probs.detach()
    s = probs[:, :, 0].mean(dim=1) if cls_row_only else probs.mean(dim=1)
    return _finish_block(block, x, attn_output(attn, o, h)), s


def qkv_into(attn: Attention, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`qkv` with the projection written into ``out`` (≥ B·T rows of 3·H·d floats): the same ``addmm`` as
    ``nn.Linear`` on the flattened tokens, so the same bits. Falls back to :func:`qkv` (``out`` unused) under
    autograd (``out=`` has no derivative), when the projection is not a plain ``nn.Linear``, or when the dtypes
    differ (autocast)."""
    B, T, D = x.shape
    lin = attn.qkv
    rows = out[: B * T] if out.dim() == 2 and out.shape[0] >= B * T else None
    same_dtype = x.dtype == lin.weight.dtype == out.dtype and not torch.is_autocast_enabled(x.device.type)
    plain = type(lin) is torch.nn.Linear and not torch.is_grad_enabled()
    if not plain or rows is None or rows.shape[1] != lin.out_features or not same_dtype:
        return qkv(attn, x)
    if lin.bias is None:
        torch.mm(x.reshape(B * T, D), lin.weight.t(), out=rows)
    else:
        torch.addmm(lin.bias, x.reshape(B * T, D), lin.weight.t(), out=rows)
    q, k, v = rows.view(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def sa_block_keep_qk(block: Block, x: Tensor, qkv_out: Tensor | None = None) -> tuple[Tensor, QueryKey]:
    """timm ``Block.forward`` (fused attention, same ops in the same order) that also hands out the block's
    queries and keys (detached) for the rollout: S_i is applied to the rollout row later, in tiles, by
    :meth:`QueryKey.left_multiply`, instead of being written out here (B·H·T² values per block).

    The queries and keys are views into the block's qkv projection, neither scaled nor copied (the scale is
    applied inside the rollout's score product); under autograd the attention backward keeps that projection
    anyway. ``qkv_out`` (inference): where to write the projection (:func:`qkv_into`), so that a caller can
    reuse the memory across calls (``DCAL`` does on the CPU: fresh pages for L projections cost 3-5 % of an
    inference at 448, measured).
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h) if qkv_out is None else qkv_into(attn, h, qkv_out)
    o, lse = attend_with_lse(attn, q, k, v)
    out = _finish_block(block, x, attn_output(attn, o, h))
    return out, QueryKey(q.detach(), k.detach(), None if lse is None else lse.detach(), attn.scale)


@torch.no_grad()
def sa_query_key(block: Block, x: Tensor) -> QueryKey:
    """Queries and keys of SA ``block`` at its input ``x``, recomputed without autograd (checkpointed training).

    Only the query and key rows of the qkv projection run.
    """
    attn = block.attn
    h = block.norm1(x)
    dim = attn.attn_dim
    q = attn.q_norm(_heads(attn, _project(attn, h, slice(0, dim))))
    k = attn.k_norm(_heads(attn, _project(attn, h, slice(dim, 2 * dim))))
    return QueryKey(q, k, scale=attn.scale)


def glca_block(block: Block, queries: Tensor, context: Tensor) -> Tensor:
    """Global-local cross-attention block (Eq. 3): ``queries`` (B, 1+k, D) attend over ``context`` (B, T, D).

    A full pre-norm block whose residuals and MLP act on the query tokens only; the same LayerNorm
    ``norm1`` normalises queries and context, as it would in self-attention.
    """
    attn = block.attn
    hq, hc = block.norm1(queries), block.norm1(context)
    q, k, v = q_and_kv(attn, hq, hc)
    return _finish_block(block, queries, attn_output(attn, attend(attn, q, k, v), hq))


def pwca_block(block: Block, x: Tensor, pairs: Tensor | None, noise: bool = False) -> Tensor:
    """Pair-wise cross-attention block (Eq. 4) with the block's own (shared) weights.

    Image ``i`` attends with its queries over ``[K_i; K_pairs[i]]`` and ``[V_i; V_pairs[i]]``: one softmax over
    all 2T keys. Keys/values of the distractor come from the same stream and layer, and gradients flow into
    both images. With ``noise=True`` the distractor's keys/values are Gaussian noise with the per-image,
    per-head mean and standard deviation of the image's own keys/values (the paper's "I_2 from noise").
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h)
    if noise:
        k2, v2 = _gaussian_like(k), _gaussian_like(v)
    else:
        k2, v2 = k[pairs], v[pairs]
    o = attend(attn, q, torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2))
    return _finish_block(block, x, attn_output(attn, o, h))


def _gaussian_like(t: Tensor) -> Tensor:
    stats = t.detach()
    mean = stats.mean(dim=(-2, -1), keepdim=True)
    std = stats.std(dim=(-2, -1), keepdim=True)
    return torch.randn_like(t) * std + mean
