"""GLCA (paper Eq. 3) as docs/design.md (GLCA) reads it, against slow per-image references written here.

``glca_pool='mean'`` (default): the ⌈R·N⌉ selected patch tokens of x_(L-1) are the queries, all tokens of x_(L-1)
the keys/values, and the feature is the mean of the queries' normed outputs, so the rollout's selection shapes
the feature. ``glca_pool='cls'`` (the earlier reading): CLS joins the queries and its output is the feature, and
then the selection provably has no effect; both properties are pinned here.
"""

from __future__ import annotations

import pytest
import torch

from dcal.model.attention import glca_block
from tests.helpers import tiny_model
from tests.model.test_dcal import B, images, ref_block, ref_embed


def x_before_last_block(model, x):
    """x_(L-1): the input of SA block L (and of GLCA), computed with timm's own blocks."""
    h = ref_embed(model, x)
    for blk in model.backbone.blocks[:-1]:
        h = blk(h)
    return h


def perturb_glca(model):
    with torch.no_grad():
        for p in model.glca_blocks.parameters():  # make GLCA differ from SA block L
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("pool", ["mean", "cls"])
@pytest.mark.parametrize("m", [1, 2])
def test_glca_matches_slow_reference(m, pool):
    """Per image: the queries (selected patches, or CLS + them) run through M reference blocks against the global
    tokens x_(L-1); feature = mean of glca_norm over the local outputs (mean) or glca_norm of the CLS output."""
    model = tiny_model(img_size=64, glca_blocks=m, glca_pool=pool).eval()
    perturb_glca(model)
    with torch.no_grad():
        x = images(size=64)
        out = model(x)
        h = x_before_last_block(model, x)
        assert out["selected"].shape == (B, model.num_local_queries)
        for i in range(B):
            q = h[i, out["selected"][i] + 1]
            if pool == "cls":
                q = torch.cat([h[i, :1], q])
            for blk in model.glca_blocks:
                q = ref_block(blk, q, h[i])
            normed = torch.stack([model.glca_norm(t) for t in q])  # the final norm on every output token
            feat = normed.mean(0) if pool == "mean" else normed[0]
            torch.testing.assert_close(out["features"]["glca"][i], feat, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out["logits"]["glca"][i], model.glca_head(feat), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out["features"]["glca"], out["features"]["sa"], atol=1e-3)


def test_mean_pool_at_initialisation_is_sa_block_l_at_the_selected_tokens():
    """GLCA starts as a copy of SA block L and each query's output depends only on itself and the keys/values,
    so at initialisation the GLCA feature is the mean of SA's own normed outputs at the selected tokens."""
    model = tiny_model(img_size=64, top_r=0.25).eval()
    with torch.no_grad():
        x = images(size=64)
        out = model(x)
        x_last = model.backbone.blocks[-1](x_before_last_block(model, x))
        picked = torch.stack([x_last[i, out["selected"][i] + 1] for i in range(B)])
        torch.testing.assert_close(out["features"]["glca"], model.backbone.norm(picked).mean(1), atol=1e-5, rtol=0)


def test_cls_pool_at_initialisation_equals_sa_cls():
    model = tiny_model(glca_pool="cls").eval()
    out = model(images())
    torch.testing.assert_close(out["features"]["glca"], out["features"]["sa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["logits"]["glca"], out["logits"]["sa"], atol=1e-5, rtol=0)


def reversed_selection(model, x):
    """The model's outputs with the rollout order reversed: the ⌈R·N⌉ *least* attended patches as queries."""
    scores = model.cls_rollout(x)
    selected = torch.topk(-scores, model.num_local_queries, dim=1).indices
    with torch.no_grad():
        h = x_before_last_block(model, x)
        out = {"logits": {}, "features": {}}
        model._head("glca", model._glca_stream(h, selected), out)
    return out, selected


@pytest.mark.parametrize("m", [1, 2])
def test_mean_pool_selection_changes_the_glca_logits(m):
    model = tiny_model(img_size=64, top_r=0.25, glca_blocks=m).eval()
    perturb_glca(model)
    x = images(size=64)
    with torch.no_grad():
        by_rollout = model(x)
    by_reverse, reverse = reversed_selection(model, x)
    assert not set(by_rollout["selected"][0].tolist()) & set(reverse[0].tolist())
    assert (by_rollout["logits"]["glca"] - by_reverse["logits"]["glca"]).abs().max() > 1e-3
    model.cfg.query_selection = "random"
    with torch.no_grad():
        by_random = model(x)
    assert (by_rollout["logits"]["glca"] - by_random["logits"]["glca"]).abs().max() > 1e-3


@pytest.mark.parametrize("m", [1, 2])
def test_cls_pool_selection_has_no_effect(m):
    """The earlier CLS reading (docs/design.md, GLCA): the CLS output never reads the local queries, any M."""
    model = tiny_model(img_size=64, top_r=0.25, glca_blocks=m, glca_pool="cls").eval()
    perturb_glca(model)
    x = images(size=64)
    with torch.no_grad():
        by_rollout = model(x)
    by_reverse, _ = reversed_selection(model, x)
    model.cfg.query_selection = "random"
    with torch.no_grad():
        by_random = model(x)
    assert not torch.equal(by_rollout["selected"], by_random["selected"])
    for other in (by_reverse, by_random):
        torch.testing.assert_close(by_rollout["features"]["glca"], other["features"]["glca"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_gradient_through_the_local_queries(pool):
    """The gradient of the GLCA logits that flows through the *query* path reaches the selected tokens of x_(L-1)
    with mean pooling (and no other patch), and none of them with cls pooling (only CLS)."""
    model = tiny_model(img_size=64, top_r=0.25, glca_pool=pool).eval()
    perturb_glca(model)
    x = images(size=64)
    with torch.no_grad():
        h = x_before_last_block(model, x)
        selected = model(x)["selected"]
    h_query = h.clone().requires_grad_(True)  # queries from here, keys/values from the detached h
    q = model.glca_queries(h_query, selected)
    for blk in model.glca_blocks:
        q = glca_block(blk, q, h)
    out = {"logits": {}, "features": {}}
    model._head("glca", q, out)
    out["logits"]["glca"].square().sum().backward()
    norms = h_query.grad.norm(dim=-1)  # (B, 1+N)
    is_selected = torch.zeros_like(norms, dtype=torch.bool)
    is_selected.scatter_(1, selected + 1, True)
    if pool == "mean":
        assert (norms[is_selected] > 0).all()
        assert (norms[~is_selected] == 0).all()
    else:
        assert (norms[is_selected] == 0).all() and (norms[:, 0] > 0).all()


def test_reid_embedding_is_sa_cls_and_pooled_glca():
    model = tiny_model(task="reid", img_size=64, top_r=0.25).eval()
    perturb_glca(model)
    with torch.no_grad():
        x = images(size=64)
        out = model(x)
        emb = model.embed(x)
    assert emb.shape == (B, 2 * 48)
    torch.testing.assert_close(emb[:, :48], out["features"]["sa"])
    torch.testing.assert_close(emb[:, 48:], out["features"]["glca"])


def test_bad_glca_pool_is_refused():
    with pytest.raises(ValueError, match="glca_pool"):
        tiny_model(glca_pool="max")
