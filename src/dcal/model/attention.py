"""Attention primitives on top of timm's ``Attention`` / ``Block`` modules.

DCAL needs three variants of one timm block, all sharing (or copying) its weights:

* self-attention that also returns the head-averaged probabilities (for the rollout of Eq. 2),
* global-local cross-attention (Eq. 3): a few query tokens against all keys/values,
* pair-wise cross-attention (Eq. 4): each image's queries against its own and a distractor's keys/values.

Each function reproduces timm's ``Block.forward`` / ``EvaBlock.forward`` exactly (pre-norm, layer scale, drop path,
optional attention-output norm and gate, Eva's separate q/v biases, rotary embeddings on the patch tokens,
grouped key/value heads), so that with the same weights and inputs the outputs are those of timm.
Attention runs in ``F.scaled_dot_product_attention`` (fused kernels), and the rollout gets each SA block's
queries and keys (:func:`sa_block_keep_qk`, :func:`sa_query_key`) instead of its probabilities; CPU inference
computes output and head-mean probabilities in one pass instead (:func:`sa_block_mean_probs`). The one switch
to explicit matmul + softmax is timm's own per-module ``fused_attn``, read here as timm reads it;
:func:`explicit_attention` turns it off for a whole model (the FLOP counter's path: torch's flop counter does
not see fused attention on the CPU), and then :func:`sa_block_with_probs` is the SA blocks' path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from dcal.model import fused_rollout
from dcal.model.rollout import QueryKey


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Every attention of ``model`` (a DCAL model or a plain timm one) as explicit matmul + softmax: timm's
    ``fused_attn`` switched off on each module that has it, and restored on exit."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused


# The pre-norm blocks and attention modules whose forward the functions below reproduce: timm's ViT block, and
# the Eva block (EVA-02, DINOv3, PE) with Eva's attention or the rotary attention with grouped key/value heads.
BLOCKS = (Block, EvaBlock)
ATTENTIONS = (Attention, EvaAttention, AttentionRope)


def check_block(block: nn.Module, where: str) -> None:
    """Raise a clear error when a backbone block is not one whose forward this module reproduces."""
    if not isinstance(block, BLOCKS) or not isinstance(block.attn, ATTENTIONS):
        raise TypeError(
            f"{where}: DCAL needs a pre-norm timm block (vision_transformer.Block or eva.EvaBlock) with Attention, "
            f"EvaAttention or AttentionRope, got {type(block).__name__} with "
            f"{type(getattr(block, 'attn', None)).__name__}"
        )


Attn = Attention | EvaAttention | AttentionRope


def _attn_dim(attn: Attn) -> int:
    return attn.num_heads * attn.head_dim


def _kv_heads(attn: Attn) -> int:
    return getattr(attn, "num_kv_heads", attn.num_heads)


def _heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """(B, T, H*d) -> (B, H, T, d)."""
    B, T, _ = x.shape
    return x.reshape(B, T, heads, head_dim).transpose(1, 2)


def _fused_bias(attn: Attn) -> Tensor | None:
    """The bias of the fused qkv projection: the Linear's own, or Eva's q/k/v biases (k's a zero buffer)."""
    if getattr(attn, "q_bias", None) is not None:
        return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv.bias if type(attn.qkv) is nn.Linear else None


def _project(attn: Attn, x: Tensor, start: int, stop: int) -> Tensor:
    """Columns ``start:stop`` of the fused qkv projection applied to ``x``: (B, T, stop - start). Only those rows
    of the weight run; a projection that is not a plain Linear (an adapter around it) runs whole and is sliced."""
    lin, bias = attn.qkv, _fused_bias(attn)
    whole = (start, stop) == (0, 3 * _attn_dim(attn))
    if type(lin) is nn.Linear:
        weight = lin.weight if whole else lin.weight[start:stop]
        return F.linear(x, weight, None if bias is None else (bias if whole else bias[start:stop]))
    y = lin(x)
    y = y if whole else y[..., start:stop]
    extra = getattr(attn, "q_bias", None) is not None  # Eva: the biases live beside the projection
    return y + bias[start:stop] if extra else y


def _qkv_separate(attn: Attn, x: Tensor, which: str) -> Tensor:
    return getattr(attn, f"{which}_proj")(x)


def rotate(attn: Attn, t: Tensor, rope: Tensor | None, prefix: int | None = None) -> Tensor:
    """Rotary embedding of queries or keys ``t`` (B, H, T, d) as timm applies it: the first ``prefix`` tokens (the
    attention's prefix tokens by default: class token and registers) keep no phase, the others ``rope``'s."""
    if rope is None:
        return t
    prefix = attn.num_prefix_tokens if prefix is None else prefix
    half = getattr(attn, "rotate_half", False)
    if prefix == 0:
        return apply_rot_embed_cat(t, rope, half=half)
    return torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2)


def _repeat_kv(attn: Attn, t: Tensor) -> Tensor:
    groups = attn.num_heads // _kv_heads(attn)
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _split_qkv(attn: Attn, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, _ = y.shape
    return y.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _norm_rotate(attn: Attn, q: Tensor, k: Tensor, rope: Tensor | None, query_rope: Tensor | None,
                 query_prefix: int | None = None) -> tuple[Tensor, Tensor]:
    """timm's q/k norms, then the rotary phases: ``rope`` on the keys' patch tokens, ``query_rope`` on the queries
    after their first ``query_prefix`` (default: the attention's prefix tokens); cast back to the projection's
    dtype (that of the values, as timm casts them)."""
    dtype = q.dtype
    q, k = attn.q_norm(q), attn.k_norm(k)
    if query_rope is not None:
        q = rotate(attn, q, query_rope, prefix=query_prefix).to(dtype)
    if rope is not None:
        k = rotate(attn, k, rope).to(dtype)
    return q, k


def _finish_qkv(attn: Attn, q: Tensor, k: Tensor, v: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    q, k = _norm_rotate(attn, q, k, rope, rope)
    return q, _repeat_kv(attn, k), _repeat_kv(attn, v)


def qkv(attn: Attn, x: Tensor, rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of already-normed tokens ``x``, each (B, H, T, d), as timm computes them: q/k
    norms, then the rotary phases ``rope`` (Eva) on the patch tokens, key/value heads repeated for grouped heads."""
    if attn.qkv is None:
        kv_heads = _kv_heads(attn)
        q = _heads(_qkv_separate(attn, x, "q"), attn.num_heads, attn.head_dim)
        k = _heads(_qkv_separate(attn, x, "k"), kv_heads, attn.head_dim)
        v = _heads(_qkv_separate(attn, x, "v"), kv_heads, attn.head_dim)
    else:
        q, k, v = _split_qkv(attn, _project(attn, x, 0, 3 * _attn_dim(attn)))
    return _finish_qkv(attn, q, k, v, rope)


def q_and_kv(attn: Attn, x_query: Tensor, x_context: Tensor, rope: Tensor | None = None,
             query_rope: Tensor | None = None, query_prefix: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Queries from ``x_query`` and keys/values from ``x_context`` with the rows of one qkv projection.

    Slicing the fused weight avoids projecting queries for the context tokens that GLCA never uses. Rotary
    embeddings: the context's patch tokens take ``rope`` (their own positions), the queries after the first
    ``query_prefix`` take ``query_rope`` (each query its own patch's phase, gathered by the caller).
    """
    dim, heads, d = _attn_dim(attn), attn.num_heads, attn.head_dim
    kv_heads = _kv_heads(attn)
    if attn.qkv is None:
        q = _qkv_separate(attn, x_query, "q")
        k, v = _qkv_separate(attn, x_context, "k"), _qkv_separate(attn, x_context, "v")
    else:
        q = _project(attn, x_query, 0, dim)
        k, v = _project(attn, x_context, dim, 3 * dim).chunk(2, dim=-1)
    q, k = _norm_rotate(attn, _heads(q, heads, d), _heads(k, kv_heads, d), rope, query_rope, query_prefix)
    return q, _repeat_kv(attn, k), _repeat_kv(attn, _heads(v, kv_heads, d))


def attention_probs(attn: Attn, q: Tensor, k: Tensor) -> Tensor:
    """Attention probabilities softmax(q kᵀ / √d), (B, H, Tq, Tk)."""
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attend(attn: Attn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v with timm's attention dropout; fused where ``attn.fused_attn`` is on, as in timm."""
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return attn.attn_drop(attention_probs(attn, q, k)) @ v


def attend_with_lse(attn: Attn, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """:func:`attend`, plus the (B, H, T) log-sum-exp of each score row where the fused kernel returns it.

    On the CPU ``F.scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``,
    which computes the softmax normalisers anyway; calling it directly gives the same output (bit for bit) and
    the normalisers, which the rollout then need not recompute. Elsewhere (CUDA, dropout, mixed dtypes,
    ``fused_attn`` off) the normalisers are None and the rollout computes its own softmax; so too while
    tracing or exporting (ONNX has no such operator: the graph gets the standard attention).
    """
    dropout = attn.training and attn.attn_drop.p > 0
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if not attn.fused_attn or dropout or exporting or q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype:
        return attend(attn, q, k, v), None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)


def attn_output(attn: Attn, o: Tensor, x_query: Tensor) -> Tensor:
    """(B, H, T, d) attention result -> projected (B, T, D): timm's norm, optional gate, proj, dropout."""
    B, _, T, _ = o.shape
    o = attn.norm(o.transpose(1, 2).reshape(B, T, _attn_dim(attn)))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(x_query).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _layer_scale(block: Block | EvaBlock, i: int, t: Tensor) -> Tensor:
    """Layer scale of branch ``i``: ``Block``'s ``ls1``/``ls2`` modules, ``EvaBlock``'s ``gamma_1``/``gamma_2``."""
    ls = getattr(block, f"ls{i}", None)
    if ls is not None:
        return ls(t)
    gamma = getattr(block, f"gamma_{i}", None)
    return t if gamma is None else gamma * t


def _finish_block(block: Block | EvaBlock, x: Tensor, attn_out: Tensor) -> Tensor:
    """Residual + MLP half of timm's ``Block.forward`` / ``EvaBlock.forward``."""
    x = x + block.drop_path1(_layer_scale(block, 1, attn_out))
    return x + block.drop_path2(_layer_scale(block, 2, block.mlp(block.norm2(x))))


def sa_block(block: Block | EvaBlock, x: Tensor, rope: Tensor | None = None) -> Tensor:
    """timm's ``Block.forward`` / ``EvaBlock.forward`` (fused attention), through this module's projections: timm's
    Eva attention reads ``qkv.weight`` directly beside its separate biases, which would skip an adapter (LoRA)
    wrapped around the projection; here every projection runs as a module."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h, rope)
    return _finish_block(block, x, attn_output(attn, attend(attn, q, k, v), h))


def sa_block_with_probs(block: Block | EvaBlock, x: Tensor, cls_row_only: bool = False,
                        rope: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """timm ``Block.forward`` with explicit attention, also returning head-averaged probabilities.

    Returns the block output (B, T, D) and the detached attention S averaged over heads (B, T, T), the input
    of the rollout (Eq. 2), or only its CLS row (B, T) with ``cls_row_only``. Dropout on attention applies to
    the output only, not to S. One softmax serves output and S: the path of blocks whose ``fused_attn`` is off
    (:func:`explicit_attention`, FLOP counting); otherwise :func:`sa_block_keep_qk` (see ``DCAL._sa_stream``).
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h, rope)
    probs = attention_probs(attn, q, k)
    o = attn.attn_drop(probs) @ v
    probs = probs.detach()
    s = probs[:, :, 0].mean(dim=1) if cls_row_only else probs.mean(dim=1)
    return _finish_block(block, x, attn_output(attn, o, h)), s


def qkv_into(attn: Attn, x: Tensor, out: Tensor, rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`qkv` with the projection written into ``out`` (≥ B·T rows of 3·H·d floats): the same ``addmm`` as
    ``nn.Linear`` on the flattened tokens, so the same bits. Falls back to :func:`qkv` (``out`` unused) under
    autograd (``out=`` has no derivative), when the projection is not one plain fused ``nn.Linear``, or when the
    dtypes differ (autocast)."""
    B, T, D = x.shape
    lin = attn.qkv
    rows = out[: B * T] if out.dim() == 2 and out.shape[0] >= B * T else None
    plain = type(lin) is nn.Linear and not torch.is_grad_enabled()
    same_dtype = plain and x.dtype == lin.weight.dtype == out.dtype and not torch.is_autocast_enabled(x.device.type)
    if not plain or rows is None or rows.shape[1] != lin.out_features or not same_dtype:
        return qkv(attn, x, rope)
    bias = _fused_bias(attn)
    if bias is None:
        torch.mm(x.reshape(B * T, D), lin.weight.t(), out=rows)
    else:
        torch.addmm(bias, x.reshape(B * T, D), lin.weight.t(), out=rows)
    return _finish_qkv(attn, *_split_qkv(attn, rows.view(B, T, -1)), rope)


def sa_block_keep_qk(block: Block | EvaBlock, x: Tensor, qkv_out: Tensor | None = None,
                     rope: Tensor | None = None) -> tuple[Tensor, QueryKey]:
    """timm ``Block.forward`` (fused attention, same ops in the same order) that also hands out the block's
    queries and keys (detached, rotary phases applied) for the rollout: S_i is applied to the rollout row later,
    in tiles, by :meth:`QueryKey.left_multiply`, instead of being written out here (B·H·T² values per block).

    Without rotary embeddings the queries and keys are views into the block's qkv projection, neither scaled nor
    copied (the scale is applied inside the rollout's score product). ``qkv_out`` (inference): where to write
    the projection (:func:`qkv_into`), so that a caller can reuse the memory across calls.
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h, rope) if qkv_out is None else qkv_into(attn, h, qkv_out, rope)
    o, lse = attend_with_lse(attn, q, k, v)
    out = _finish_block(block, x, attn_output(attn, o, h))
    return out, QueryKey(q.detach(), k.detach(), None if lse is None else lse.detach(), attn.scale)


def sa_block_mean_probs(block: Block | EvaBlock, x: Tensor, mean_out: Tensor,
                        rope: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """timm ``Block.forward`` with the attention computed by the one-pass CPU kernel
    (:func:`dcal.model.fused_rollout.attention_mean`), which also writes the block's head-averaged probabilities
    S_i into ``mean_out`` (a contiguous float32 (B, T, T) tensor): one QKᵀ serves output and rollout. Inference
    only (no autograd, no attention dropout); the caller checks that the kernel is available."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h, rope)
    o = fused_rollout.attention_mean(q, k, v, attn.scale, mean_out)
    return _finish_block(block, x, attn_output(attn, o, h)), mean_out


@torch.no_grad()
def sa_query_key(block: Block | EvaBlock, x: Tensor, rope: Tensor | None = None) -> QueryKey:
    """Queries and keys of SA ``block`` at its input ``x``, recomputed without autograd (checkpointed training).

    Only the query and key rows of the qkv projection run: the values are not needed.
    """
    attn = block.attn
    h = block.norm1(x)
    if attn.qkv is None:
        q, k = _qkv_separate(attn, h, "q"), _qkv_separate(attn, h, "k")
    else:
        q, k = _project(attn, h, 0, 2 * _attn_dim(attn)).chunk(2, dim=-1)
    q, k = _heads(q, attn.num_heads, attn.head_dim), _heads(k, _kv_heads(attn), attn.head_dim)
    q, k = _norm_rotate(attn, q, k, rope, rope)
    return QueryKey(q, _repeat_kv(attn, k), scale=attn.scale)


def glca_block(block: Block | EvaBlock, queries: Tensor, context: Tensor, rope: Tensor | None = None,
               query_rope: Tensor | None = None, query_prefix: int = 0) -> Tensor:
    """Global-local cross-attention block (Eq. 3): ``queries`` (B, k, D) attend over ``context`` (B, T, D).

    A full pre-norm block whose residuals and MLP act on the query tokens only; the same LayerNorm
    ``norm1`` normalises queries and context, as it would in self-attention. Rotary embeddings (Eva): the
    context's patch tokens carry ``rope``, the queries after the first ``query_prefix`` (a class token with
    ``glca_pool='cls'``) ``query_rope``: each local query the phase of its own patch position.
    """
    attn = block.attn
    hq, hc = block.norm1(queries), block.norm1(context)
    q, k, v = q_and_kv(attn, hq, hc, rope, query_rope, query_prefix)
    return _finish_block(block, queries, attn_output(attn, attend(attn, q, k, v), hq))


def pwca_block(block: Block | EvaBlock, x: Tensor, pairs: Tensor | None, noise: bool = False,
               rope: Tensor | None = None) -> Tensor:
    """Pair-wise cross-attention block (Eq. 4) with the block's own (shared) weights.

    Image ``i`` attends with its queries over ``[K_i; K_pairs[i]]`` and ``[V_i; V_pairs[i]]``: one softmax over
    all 2T keys, prefix tokens (class token, registers) included. Keys/values of the distractor come from the
    same stream and layer, and gradients flow into both images; with rotary embeddings each image's keys carry
    their own patches' phases (the same grid). With ``noise=True`` the distractor's keys/values are Gaussian noise
    with the per-image, per-head mean and standard deviation of the image's own keys/values (the paper's "I_2
    from noise").
    """
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv(attn, h, rope)
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
