"""The tiled rollout (queries and keys, never the B·H·T² probabilities) against explicit full-matrix references."""

from __future__ import annotations

import pytest
import torch

from dcal.model.attention import attend_with_lse, explicit_attention, qkv, sa_block_keep_qk
from dcal.model.rollout import QueryKey, cls_attention_row, rollout_cls_row
from tests.conftest import tiny_model


def random_qk(b: int, h: int, t: int, d: int = 8) -> tuple[QueryKey, torch.Tensor]:
    """Queries/keys with a spread of scores (peaked and flat rows) and their explicit head-averaged map."""
    q, k = torch.randn(b, h, t, d) * 1.5, torch.randn(b, h, t, d)
    s = (q @ k.transpose(-2, -1)).softmax(-1).mean(1)
    return QueryKey(q, k), s


@pytest.mark.parametrize(("b", "h", "t"), [(1, 1, 7), (3, 3, 50), (2, 2, 97)])
@pytest.mark.parametrize("tile", ["one row", "not dividing", "two problems", "all"])
def test_left_multiply_equals_row_times_explicit_map(b, h, t, tile):
    qk, s = random_qk(b, h, t)
    r = torch.rand(b, t)
    elements = {"one row": t, "not dividing": 7 * t + 5, "two problems": 2 * t * t + t, "all": b * h * t * t}[tile]
    got = qk.left_multiply(r, tile_elements=elements)
    torch.testing.assert_close(got, torch.bmm(r.unsqueeze(1), s).squeeze(1), atol=1e-6, rtol=1e-5)


def test_left_multiply_with_forward_normalisers_equals_softmax_path():
    qk, s = random_qk(2, 3, 40)
    lse = torch.logsumexp(qk.q @ qk.k.transpose(-2, -1), dim=-1)
    r = torch.rand(2, 40)
    got = QueryKey(qk.q, qk.k, lse).left_multiply(r, tile_elements=3 * 40 + 7)
    torch.testing.assert_close(got, torch.bmm(r.unsqueeze(1), s).squeeze(1), atol=1e-6, rtol=1e-5)


def test_rollout_from_queries_and_keys_equals_rollout_from_maps():
    layers = [random_qk(3, 2, 33) for _ in range(4)]
    by_maps = rollout_cls_row([s for _, s in layers])
    by_qk = rollout_cls_row([qk for qk, _ in layers])
    torch.testing.assert_close(by_qk, by_maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_attention_row(layers[-1][0]), layers[-1][1][:, 0], atol=1e-6, rtol=1e-5)


def test_attend_with_lse_is_fused_attention_and_its_normalisers():
    model = tiny_model().eval()
    attn = model.backbone.blocks[0].attn
    q, k, v = qkv(attn, torch.randn(2, 17, 48))
    out, lse = attend_with_lse(attn, q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * attn.scale, dim=-1))


@pytest.mark.parametrize("grad", [False, True])
def test_sa_block_keep_qk_is_timm_block(grad):
    """Same output bits as timm's Block.forward, and the same input gradient, with and without autograd."""
    blk = tiny_model().backbone.blocks[1]
    x = torch.randn(2, 17, 48, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        got, qk = sa_block_keep_qk(blk, x)
        want = blk(x)
    assert torch.equal(got, want) and not qk.q.requires_grad and qk.lse is not None
    if grad:
        (g_got,) = torch.autograd.grad(got.square().sum(), x)
        (g_want,) = torch.autograd.grad(want.square().sum(), x)
        assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("mode", ["eval", "train", "train+ckpt"])
def test_model_selection_equals_explicit_attention_path(mode):
    """Same selected local queries and rollout as the explicit-map path (FLOP counting), in every SA path."""
    model = tiny_model(img_size=64).train(mode != "eval")  # N = 16, T = 17
    model.set_grad_checkpointing(mode == "train+ckpt")
    x = torch.randn(3, 3, 64, 64)
    pairs = torch.tensor([1, 2, 0])
    with torch.no_grad(), explicit_attention():
        want = model(x, pairs=pairs)
        want_rollout = model.cls_rollout(x)
    got = model(x, pairs=pairs)
    assert torch.equal(got["selected"], want["selected"])
    torch.testing.assert_close(model.cls_rollout(x), want_rollout, atol=1e-6, rtol=1e-5)
    assert set(got["logits"]) == set(want["logits"])
    for branch in got["logits"]:
        torch.testing.assert_close(got["logits"][branch], want["logits"][branch], atol=1e-5, rtol=1e-4)
