"""The backbones DCAL runs on, and the few steps in which they differ (docs/design.md, "Backbones").

Two timm families:

* ``VisionTransformer`` (DeiT, ViT, DINOv2 with registers, CLIP, SigLIP): learned position embedding, any number
  of prefix tokens P (class token if any, then registers), pooling by class token (``'token'``), patch mean
  (``'avg'``) or attention pooling (``'map'``, SigLIP).
* ``Eva`` (EVA-02, DINOv3, PE-core): rotary position embeddings on the patch tokens (prefix tokens keep none), an
  optional absolute position embedding, registers, the same three poolings.

Tokens are ordered prefix first, then the N patches, T = P + N in all. Everything else (the blocks) is handled
by :mod:`dcal.model.attention`, which reproduces both families' blocks.

What differs per family, here:

* :func:`embed` – the steps before the blocks; Eva also returns the rotary phases ``rope`` of the N patches.
* :func:`block_rope` / :func:`gather_rope` – a block's phases, and the phases of selected patches (GLCA's queries).
* :func:`pooled_feature` – the backbone's own pooled feature (its norms and pooling), the SA feature.
* :func:`pooling_weights` – r₀, how that pooled feature weighs the T tokens of x_L: the row the rollout pushes
  through the layers (None for the class token, whose row is cheaper to take directly).
"""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from dcal.model.attention import check_block
from dcal.vocabulary import BACKBONE_POOLS as POOLS

Backbone = VisionTransformer | Eva


def backbone_label(backbone: nn.Module) -> str:
    """The backbone's timm architecture name, for messages (its class name when timm did not build it)."""
    cfg = getattr(backbone, "pretrained_cfg", None)
    return (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(backbone).__name__


def check_backbone(backbone: nn.Module) -> None:
    """Raise one clear line when ``backbone`` is not a timm ViT that DCAL can run (docs/design.md, "Backbones")."""
    name = backbone_label(backbone)
    if not isinstance(backbone, (VisionTransformer, Eva)):
        raise TypeError(f"backbone {name!r}: DCAL needs a timm VisionTransformer or Eva, got {type(backbone).__name__}")
    pool = backbone.global_pool
    if pool not in POOLS:
        raise ValueError(f"backbone {name!r}: global_pool={pool!r} is not supported: DCAL's rollout follows the pooled "
                         f"feature's row, defined for {POOLS} (pass global_pool= one of them)")
    if pool == "map" and not isinstance(backbone.attn_pool, AttentionPoolLatent):
        raise ValueError(f"backbone {name!r}: global_pool='map' needs timm's AttentionPoolLatent, got "
                         f"{type(backbone.attn_pool).__name__}")
    if getattr(backbone, "dynamic_img_size", False):
        raise ValueError(f"backbone {name!r}: dynamic_img_size is not supported (N and ⌈R·N⌉ must be fixed); "
                         "build it with dynamic_img_size=False and an img_size")
    drop = backbone.patch_drop
    if drop is not None and not isinstance(drop, nn.Identity):
        raise ValueError(f"backbone {name!r}: patch dropout (patch_drop_rate > 0) changes the number of tokens, "
                         "which GLCA's selection and PWCA's pairing need fixed; build it with patch_drop_rate=0")
    for i, blk in enumerate(backbone.blocks):
        check_block(blk, f"backbone {name!r} block {i}")
        prefix = getattr(blk.attn, "num_prefix_tokens", backbone.num_prefix_tokens)
        if prefix != backbone.num_prefix_tokens:
            raise ValueError(f"backbone {name!r} block {i}: its attention leaves {prefix} prefix tokens without "
                             f"rotary phases, the model has {backbone.num_prefix_tokens}")


def embed(backbone: Backbone, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """timm's steps before the blocks: patch embedding, prefix tokens, position embedding (resampled to the
    image size at creation), pre-norm. Returns the (B, T, D) tokens and, for Eva with rotary embeddings, the
    phases of the N patch positions (else None)."""
    x = backbone.patch_embed(images)
    if isinstance(backbone, Eva):
        x, rope = backbone._pos_embed(x)  # patch dropout, which would also return indices, is refused
        return backbone.norm_pre(x), rope
    return backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(x))), None


def block_rope(backbone: Backbone, rope: Tensor | None, i: int) -> Tensor | None:
    """Rotary phases of block ``i``: the same for every block, or block ``i``'s own (Eva's ``rope_type='mixed'``)."""
    if rope is None or not getattr(backbone, "rope_mixed", False):
        return rope
    return rope[i]


def gather_rope(rope: Tensor | None, selected: Tensor) -> Tensor | None:
    """The phases of the selected patches, (B, 1 or H, k, 2d), for ``selected`` (B, k) patch indices: each local
    query keeps its own position's rotation. ``rope`` is (N, 2d), or (H, N, 2d) with per-head phases."""
    if rope is None:
        return None
    if rope.dim() == 2:
        return rope[selected].unsqueeze(1)
    return rope[:, selected].transpose(0, 1)


def _pool_input(backbone: Backbone, x_normed: Tensor) -> tuple[Tensor, int]:
    """What the pooling reads of the normed x_L, and the index of its first token among the T."""
    prefix = backbone.num_prefix_tokens
    if isinstance(backbone, VisionTransformer) and not backbone.pool_include_prefix:
        return x_normed[:, prefix:], prefix
    return x_normed, 0


def pooled_feature(backbone: Backbone, x: Tensor) -> Tensor:
    """The backbone's own feature of the last block's tokens x (B, T, D): final norm, pooling, ``fc_norm`` (what
    timm's ``forward_head(..., pre_logits=True)`` returns, before the head's dropout)."""
    if backbone.global_pool == "token" and getattr(backbone, "attn_pool", None) is None:
        return backbone.fc_norm(backbone.norm(x[:, 0]))  # the norm acts per token: the class token's alone
    return backbone.fc_norm(backbone.pool(backbone.norm(x)))


def pooling_weights(backbone: Backbone, x: Tensor) -> Tensor | None:
    """r₀ (B, T): the weight the pooled feature gives each token of x_L, the row the rollout starts from.

    ``'token'``: None (the class token, e₀; the rollout takes its row directly). ``'avg'``: 1/N on each pooled
    token (the patches; all T where timm's ``pool_include_prefix`` is set). ``'map'``: the attention pooling's
    probabilities, averaged over heads (and over its latent queries when it averages them), on the tokens it
    reads; its latent query is no token, so no identity term is added (docs/design.md, "Backbones").
    """
    B, T, _ = x.shape
    pool = backbone.global_pool
    if pool == "token":
        return None
    if pool == "avg":
        first = backbone.num_prefix_tokens if not getattr(backbone, "pool_include_prefix", False) else 0
        return uniform_weights(B, T, first, x.device)
    weights = x.new_zeros(B, T, dtype=torch.float32)
    tokens, first = _pool_input(backbone, backbone.norm(x))
    weights[:, first:] = _attention_pool_probs(backbone.attn_pool, tokens)
    return weights


def uniform_weights(batch: int, tokens: int, first: int, device: torch.device) -> Tensor:
    """(batch, tokens) float32: 1/(tokens - first) on the tokens from ``first`` on (the patch mean), 0 before."""
    weights = torch.zeros(batch, tokens, dtype=torch.float32, device=device)
    weights[:, first:] = 1.0 / (tokens - first)
    return weights


@torch.no_grad()
def _attention_pool_probs(pool: AttentionPoolLatent, x: Tensor) -> Tensor:
    """Head-mean attention probabilities (B, n) of timm's ``AttentionPoolLatent`` over its n input tokens, as its
    forward computes them (position embedding, q/k norms, scale); over its latents as its output reads them."""
    B, n, _ = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k = pool.kv(x).reshape(B, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)[0]
    q, k = pool.q_norm(q), pool.k_norm(k)
    probs = ((q.float() * pool.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, H, latents, n)
    probs = probs.mean(dim=1)
    return probs[:, 0] if pool.pool == "token" else probs.mean(dim=1)
