"""The model against the paper's equations and docs/design.md, with slow references written here."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import dcal
from dcal.model.dcal import DCAL
from tests.helpers import TINY_ARCH, tiny_model

B = 4


def images(n=B, size=32):
    return torch.randn(n, 3, *((size, size) if isinstance(size, int) else size))


def plain_timm_like(model: DCAL, img_size=32):
    """The plain timm model with the DCAL backbone's weights."""
    ref = timm.create_model(
        "deit_tiny_patch16_224", num_classes=model.backbone.num_classes, img_size=img_size, **TINY_ARCH
    )
    ref.load_state_dict(model.backbone.state_dict())
    return ref


# ------------------------------------------------------------------------------------------ slow references
def ref_attention(blk, xq, xkv):
    """Multi-head attention of normed queries xq (Tq, D) over normed xkv (Tk, D), one image, loops over heads."""
    attn = blk.attn
    D = xq.shape[-1]
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = xq @ w[:D].T + b[:D], xkv @ w[D : 2 * D].T + b[D : 2 * D], xkv @ w[2 * D :].T + b[2 * D :]
    d = attn.head_dim
    heads = []
    for h in range(attn.num_heads):
        s = slice(h * d, (h + 1) * d)
        p = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1)
        heads.append(p @ v[:, s])
    return attn.proj(torch.cat(heads, dim=-1))


def ref_block(blk, xq, xkv_raw):
    """Pre-norm block: queries xq (Tq, D) over raw tokens xkv_raw (Tk, D); residual + MLP on the queries."""
    x = xq + ref_attention(blk, blk.norm1(xq), blk.norm1(xkv_raw))
    return x + blk.mlp(blk.norm2(x))


def ref_attention_probs(blk, x):
    """Head-averaged self-attention probabilities (B, T, T) of block input x (B, T, D)."""
    attn = blk.attn
    h = blk.norm1(x)
    Bn, T, D = h.shape
    qkv = attn.qkv(h).reshape(Bn, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1).mean(1)


def ref_embed(model, x):
    bb = model.backbone
    return bb._pos_embed(bb.patch_embed(x))


# ----------------------------------------------------------------------------------------------- SA stream
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sa_only_equals_plain_timm(mode):
    model = tiny_model(glca_blocks=0, pwca_blocks=0)
    ref = plain_timm_like(model)
    model.train(mode == "train")
    ref.train(mode == "train")
    x = images()
    out = model(x)
    assert set(out["logits"]) == {"sa"}
    torch.testing.assert_close(out["logits"]["sa"], ref(x), atol=1e-5, rtol=0)
    if mode == "eval":
        torch.testing.assert_close(model.predict(x), ref(x).softmax(-1), atol=1e-5, rtol=0)


def test_sa_stream_of_full_dcal_equals_timm_and_backbone_is_timm():
    """With explicit attention for the rollout, SA logits still equal timm's; model.backbone *is* the timm model."""
    model = tiny_model().eval()
    assert isinstance(model.backbone, timm.models.vision_transformer.VisionTransformer)
    ref = plain_timm_like(model).eval()
    x = images()
    torch.testing.assert_close(model(x)["logits"]["sa"], ref(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.backbone(x), ref(x), atol=0, rtol=0)


# -------------------------------------------------------------------------------------------------- rollout
def test_rollout_equals_full_matrix_reference():
    model = tiny_model().eval()
    x = images()
    with torch.no_grad():
        h = ref_embed(model, x)
        T = h.shape[1]
        eye = torch.eye(T).expand(B, T, T)
        acc = eye
        for blk in model.backbone.blocks:  # Ŝ_L = S̄_L … S̄_1, built as full matrices
            s_bar = 0.5 * ref_attention_probs(blk, h) + 0.5 * eye
            acc = s_bar @ acc
            h = blk(h)
        expected = acc[:, 0, 1:]
    got = model.cls_rollout(x)
    assert got.shape == (B, model.num_patches)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_rollout_row_is_a_distribution_and_uses_every_layer():
    s1 = torch.softmax(torch.randn(2, 5, 5), -1)
    s2 = torch.softmax(torch.randn(2, 5, 5), -1)
    row = dcal.rollout_cls_row([s1, s2])
    torch.testing.assert_close(row.sum(-1), torch.ones(2))
    expected = ((0.5 * s2 + 0.5 * torch.eye(5)) @ (0.5 * s1 + 0.5 * torch.eye(5)))[:, 0]
    torch.testing.assert_close(row, expected)
    torch.testing.assert_close(dcal.rollout_cls_row([s1, s2[:, 0]]), expected)  # last layer as its CLS row


@pytest.mark.parametrize(("r", "n", "k"), [(0.1, 784, 79), (0.3, 128, 39), (0.1, 30, 3), (0.3, 10, 3), (1.0, 7, 7)])
def test_number_of_local_queries_is_ceil_r_n(r, n, k):
    assert dcal.num_local_queries(r, n) == k


def test_top_r_selects_exactly_the_highest_rollout_patches():
    model = tiny_model(img_size=64, top_r=0.3).eval()  # N = 16 → ⌈4.8⌉ = 5
    x = images(size=64)
    out = model(x)
    scores = model.cls_rollout(x)
    k = math.ceil(0.3 * 16)
    assert out["selected"].shape == (B, k)
    for i in range(B):
        chosen = scores[i, out["selected"][i]]
        rest = torch.ones(16, dtype=torch.bool)
        rest[out["selected"][i]] = False
        assert len(set(out["selected"][i].tolist())) == k
        assert chosen.min() >= scores[i, rest].max()


def test_last_layer_and_random_selection():
    model = tiny_model(img_size=64, top_r=0.25, query_selection="last_layer").eval()
    x = images(size=64)
    with torch.no_grad():
        h = ref_embed(model, x)
        for blk in model.backbone.blocks[:-1]:
            h = blk(h)
        last = ref_attention_probs(model.backbone.blocks[-1], h)[:, 0, 1:]
    sel = model(x)["selected"]
    assert torch.equal(sel.sort(1).values, last.topk(4, dim=1).indices.sort(1).values)
    model.cfg.query_selection = "random"
    s1, s2 = model(x)["selected"], model(x)["selected"]
    assert s1.shape == (B, 4) and not torch.equal(s1, s2)


# ----------------------------------------------------------------------------------------------------- PWCA
def test_pwca_with_self_pairs_equals_sa_and_real_distractor_changes_it():
    model = tiny_model().train()
    x = images()
    out = model(x, pairs=torch.arange(B))
    torch.testing.assert_close(out["logits"]["pwca"], out["logits"]["sa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["features"]["pwca"], out["features"]["sa"], atol=1e-5, rtol=0)
    other = model(x, pairs=torch.tensor([1, 0, 3, 2]))
    assert not torch.allclose(other["features"]["pwca"], other["features"]["sa"], atol=1e-3)


@pytest.mark.parametrize("t", [3, 2])
def test_pwca_matches_slow_reference(t):
    """Eq. 4 at every layer: the distractor's K/V come from the same PWCA stream at the same layer; one softmax
    over 2N+2 keys; blocks after T are plain self-attention."""
    model = tiny_model(pwca_blocks=t).train()
    pairs = torch.tensor([2, 3, 1, 0])
    x = images()
    with torch.no_grad():
        out = model(x, pairs=pairs)
        h = ref_embed(model, x)
        for li, blk in enumerate(model.backbone.blocks):
            if li < t:
                h = torch.stack([ref_block(blk, h[i], torch.cat([h[i], h[pairs[i]]])) for i in range(B)])
            else:
                h = blk(h)
        ref_feat = model.backbone.norm(h[:, 0])
    torch.testing.assert_close(out["features"]["pwca"], ref_feat, atol=1e-5, rtol=1e-4)


def test_pwca_gradient_flows_into_both_images():
    model = tiny_model(glca_blocks=0).train()
    x = images().requires_grad_(True)
    # Mutual pairs (0↔1, 2↔3): with a longer cycle image 0 would depend on 2 as well, through image 1's
    # own distractor at the layers below.
    out = model(x, pairs=torch.tensor([1, 0, 3, 2]))
    out["logits"]["pwca"][0].sum().backward()  # image 0's loss, distractor image 1
    grad_per_image = x.grad.abs().sum(dim=(1, 2, 3))
    assert grad_per_image[0] > 0 and grad_per_image[1] > 0
    assert grad_per_image[2] == 0 and grad_per_image[3] == 0


def test_pwca_never_runs_in_eval_mode():
    model = tiny_model().eval()
    out = model(images(), pairs=torch.tensor([1, 0, 3, 2]))
    assert set(out["logits"]) == {"sa", "glca"} and "pairs" not in out


def test_default_pairs_are_derangements_and_strategies():
    for n in (2, 3, 16):
        for _ in range(20):
            p = dcal.random_derangement(n)
            assert sorted(p.tolist()) == list(range(n)) and not bool((p == torch.arange(n)).any())
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    intra = dcal.sample_pairs("intra", 9, y)
    inter = dcal.sample_pairs("inter", 9, y)
    ar = torch.arange(9)
    assert bool((intra != ar).all()) and bool((inter != ar).all())
    assert bool((y[intra] == y).all()) and bool((y[inter] != y).all())
    y_single = torch.tensor([0, 1, 1, 2])  # classes 0 and 2 have no partner of their own class: fallback
    fallback = dcal.sample_pairs("intra", 4, y_single)
    assert bool((fallback != torch.arange(4)).all()) and y_single[fallback[1]] == 1
    with pytest.raises(ValueError, match="targets"):
        dcal.sample_pairs("inter", 4, None)
    with pytest.raises(ValueError, match="batch size"):
        dcal.random_derangement(1)


def test_noise_distractor_runs_and_differs_from_self_attention():
    model = tiny_model(pair_strategy="noise").train()
    out = model(images())
    assert out["pairs"] is None
    assert not torch.allclose(out["features"]["pwca"], out["features"]["sa"], atol=1e-3)


def test_intra_class_pairs_through_the_model():
    model = tiny_model(pair_strategy="intra").train()
    y = torch.tensor([0, 1, 0, 1])
    out = model(images(), targets=y)
    assert bool((y[out["pairs"]] == y).all())


def test_pair_shortfall_warns_only_far_from_what_the_strategy_asks():
    from dcal.model.pairs import pair_shortfall

    message = pair_shortfall("intra", 45.8, 32)
    assert "model.pair_strategy=intra asks for 100% same-class PWCA pairs but got 45.8%" in message
    assert "batch of 32" in message and "\n" not in message
    assert pair_shortfall("intra", 92.0, 32) is None and pair_shortfall("mix", 45.0, 32) is None
    assert pair_shortfall("mix", 22.8, 32) is not None and pair_shortfall("inter", 11.0, 8) is not None
    assert pair_shortfall("random", 2.0, 32) is None  # random asks for nothing in particular


def test_bad_pairs_are_rejected_clearly():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="shape"):
        model(images(), pairs=torch.arange(3))
    with pytest.raises(ValueError, match="index the batch"):
        model(images(), pairs=torch.tensor([1, 2, 3, 4]))


# ------------------------------------------------------------------------------------------ parameters, grads
def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_pwca_adds_no_parameters_and_glca_adds_one_block_norm_and_head():
    base = tiny_model(glca_blocks=0, pwca_blocks=0)
    pwca = tiny_model(glca_blocks=0, pwca_blocks=3)
    full = tiny_model(glca_blocks=1, pwca_blocks=3)
    assert n_params(pwca) == n_params(base)
    bb = base.backbone
    assert n_params(full) - n_params(base) == n_params(bb.blocks[-1]) + n_params(bb.norm) + n_params(bb.head)


@pytest.mark.parametrize("task", ["fgvc", "reid"])
def test_every_trainable_parameter_gets_a_gradient_and_loss_weights_move(task):
    from dcal.losses import DCALLoss, param_groups

    model = tiny_model(task=task).train()
    crit = DCALLoss(task, model.branches)
    opt = torch.optim.AdamW(param_groups(model, crit, 0.05), lr=1e-2)
    y = torch.tensor([0, 0, 1, 1])
    loss = crit(model(images(), targets=y), y).total
    loss.backward()
    named = list(model.named_parameters()) + [("loss." + n, p) for n, p in crit.named_parameters()]
    missing = [n for n, p in named if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing
    zero = [n for n, p in named if p.requires_grad and p.grad.abs().sum() == 0]
    assert not zero, zero
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for _, p in named if p.requires_grad)
    lw = [g for g in opt.param_groups if g["name"] == "loss_weights"][0]
    assert lw["weight_decay"] == 0.0 and len(lw["params"]) == len(model.branches)
    before = [p.detach().clone() for p in crit.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, crit.parameters(), strict=True))


def test_reid_bnneck_and_pwca_leaves_running_stats_to_sa():
    model = tiny_model(task="reid").train()
    assert not model.sa_neck.bn.bias.requires_grad and model.sa_neck.classifier.bias is None
    x = images()
    ref = tiny_model(task="reid", pwca_blocks=0).train()
    ref.load_state_dict(model.state_dict())
    out = model(x)
    ref(x)
    assert set(out["bn_features"]) == {"sa", "glca", "pwca"}
    torch.testing.assert_close(model.sa_neck.bn.running_mean, ref.sa_neck.bn.running_mean)
    model.eval()
    emb = model.embed(x)
    o = model(x)
    torch.testing.assert_close(emb, torch.cat([o["features"]["sa"], o["features"]["glca"]], -1))
    torch.testing.assert_close(
        model.embed(x, after_bn=True), torch.cat([o["bn_features"]["sa"], o["bn_features"]["glca"]], -1)
    )


def test_predict_sums_probabilities_and_options():
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.glca_head.parameters():
            p.add_(torch.randn_like(p))
    x = images()
    o = model(x)
    expected = o["logits"]["sa"].softmax(-1) + o["logits"]["glca"].softmax(-1)
    torch.testing.assert_close(model.predict(x), expected)
    torch.testing.assert_close(model.predict(x, fusion="sa"), o["logits"]["sa"].softmax(-1))
    torch.testing.assert_close(model.predict(x, fusion="glca"), o["logits"]["glca"].softmax(-1))
    assert not torch.allclose(model.predict(x), F.softmax((o["logits"]["sa"] + o["logits"]["glca"]) / 2, -1))


# --------------------------------------------------------------------------------------- backbones, configs
@pytest.mark.parametrize(
    "name",
    [
        "deit_tiny_patch16_224",
        "deit_small_patch16_224",
        "deit_base_patch16_224",
        "vit_base_patch16_224.augreg_in21k",
        "vit_base_r50_s16_224",
    ],
)
def test_listed_backbones_build_and_run_forward_backward(name):
    model = dcal.create_model(name, num_classes=3, img_size=(32, 48), top_r=0.5, pwca_blocks=2).train()
    x = torch.randn(2, 3, 32, 48)
    out = model(x)
    assert out["selected"].shape == (2, 3)
    sum(v.sum() for v in out["logits"].values()).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize(("size", "n"), [(448, 784), ((256, 128), 128), ((256, 256), 256)])
def test_img_size_int_or_pair_resamples_position_embedding(size, n):
    model = tiny_model(num_classes=2, img_size=size, depth=1)
    assert model.num_patches == n and model.backbone.pos_embed.shape[1] == n + 1


def test_defaults_and_config_errors():
    assert tiny_model().cfg.top_r == 0.1 and tiny_model(task="reid").cfg.top_r == 0.3
    with pytest.raises(ValueError, match="pwca_blocks"):
        tiny_model(pwca_blocks=4)
    with pytest.raises(ValueError, match="top_r"):
        tiny_model(top_r=0.0)
    with pytest.raises(ValueError, match="query_selection"):
        tiny_model(query_selection="penultimate")
    with pytest.raises(ValueError, match="class token"):  # glca_pool='cls' needs one (issue 19: avg pool works)
        tiny_model(class_token=False, global_pool="avg", glca_pool="cls")
    with pytest.raises(ValueError, match="global_pool='max'"):
        tiny_model(global_pool="max")
    with pytest.raises(ValueError, match="not both"):
        tiny_model(pretrained=True, pretrained_file="x.pth")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    x = images()
    pairs = torch.tensor([1, 0, 3, 2])
    torch.manual_seed(1)
    sum(v.sum() for v in model(x, pairs=pairs)["logits"].values()).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    sum(v.sum() for v in model(x, pairs=pairs)["logits"].values()).backward()
    for a, p in zip(g1, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_pairs_outside_the_batch_are_refused_by_name():
    model = tiny_model().train()
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pairs must index the batch \(0\.\.2\), got values \[1, 3, 0\]"):
        model(x, pairs=torch.tensor([1, 3, 0]))
    with pytest.raises(ValueError, match=r"pairs must be an integer tensor of shape \(3,\)"):
        model(x, pairs=torch.tensor([1.0, 2.0, 0.0]))


def test_flip_embedding_is_the_mean_with_the_mirrored_images():
    model = tiny_model(task="reid", img_size=(32, 16)).eval()
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        plain, mirrored = model.embed(x), model.embed(x.flip(3))
        got = model.embed(x, flip=True)
    torch.testing.assert_close(got, 0.5 * (plain + mirrored), atol=0, rtol=0)
    assert got.dtype == torch.float32 and not torch.allclose(got, plain)


def test_scores_of_several_selections_from_one_pass_equal_each_alone():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 32)
    both = model.scores_by_selection(x)
    for name in ("rollout", "last_layer"):
        torch.testing.assert_close(both[name], model.selection_scores(x, name), atol=0, rtol=0)
    assert not torch.equal(both["rollout"], both["last_layer"])
    with pytest.raises(ValueError, match="selection must be 'rollout' or 'last_layer', got 'random'"):
        model.scores_by_selection(x, ("rollout", "random"))
