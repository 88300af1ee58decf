"""Parameter/FLOP counting (Table 3) against closed-form counts of a tiny ViT."""

from __future__ import annotations

import pytest

from dcal.model.complexity import count_macs, inference_params
from tests.helpers import tiny_model


def vit_macs(n_tokens: int, dim: int, depth: int, n_patches: int, patch_dim: int, classes: int) -> int:
    per_block = 12 * dim * dim * n_tokens + 2 * n_tokens * n_tokens * dim  # qkv+proj+mlp, QKᵀ and PV
    return depth * per_block + n_patches * patch_dim * dim + dim * classes


def test_baseline_macs_include_attention():
    model = tiny_model(img_size=64, glca_blocks=0, pwca_blocks=0)  # N = 16, D = 48, L = 3
    expected = vit_macs(17, 48, 3, 16, 3 * 16 * 16, 5)
    assert count_macs(model, 64, ("sa",)) == expected


def test_overlapping_patches_macs():
    """Stride 6 with 16x16 patches at 64x64: a 9x9 grid of the same kernel, every block on 82 tokens."""
    model = tiny_model(img_size=64, glca_blocks=0, pwca_blocks=0, patch_stride=6)
    assert count_macs(model, 64, ("sa",)) == vit_macs(82, 48, 3, 81, 3 * 16 * 16, 5)


@pytest.mark.parametrize("pool, q", [("mean", 4), ("cls", 5)])
def test_glca_adds_one_block_on_local_queries_and_pwca_adds_nothing_at_inference(pool, q):
    """k = 4 local queries (CLS joins them with glca_pool=cls) against t = 17 keys; the mean pooling is no matmul."""
    full = tiny_model(img_size=64, top_r=0.25, glca_pool=pool)
    base = tiny_model(img_size=64, glca_blocks=0, pwca_blocks=0)
    d, t = 48, 17
    glca = q * d * d + 2 * t * d * d + d * d * q + 8 * d * d * q + 2 * q * t * d + d * 5  # q, kv, proj, mlp, attn, head
    rollout = 2 * t * t  # the CLS row pushed through L-1 = 2 full layers
    assert count_macs(full, 64, full.branches) - count_macs(base, 64, ("sa",)) == glca + rollout
    assert inference_params(full, ("sa",)) == inference_params(base, ("sa",))
