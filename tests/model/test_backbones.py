"""DCAL on the backbones beyond "one class token" (docs/design.md, "Backbones"): registers, no class token,
token / avg / map pooling, timm's Eva with rotary embeddings. Each family is a small-depth, small-width variant
of the real timm architecture (random weights: nothing can be downloaded here).

References come from timm itself wherever it can give them: its forward (SA), its attention probabilities
(read from its non-fused path through a hook on ``attn_drop``), and its block forward on all T tokens, whose rows
at the selected patches are GLCA's outputs (each query's output depends only on itself and the keys/values,
rotary phases included). The attention pooling's probabilities and PWCA's 2T-key attention are written out here.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva

import dcal
from dcal.model.attention import explicit_attention, glca_block, pwca_block
from dcal.model.backbone import block_rope, gather_rope
from dcal.model.dcal import model_config

# name -> timm kwargs of a small variant; all at 32x32 with 8x8 patches: N = 16
FAMILIES = {
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}),  # 1 class token + 4 registers, layer scale
    "clip": ("vit_base_patch16_clip_224", {}),  # norm_pre, quick-gelu
    "siglip_map": ("vit_base_patch16_siglip_224", {}),  # no class token, attention pooling
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", {}),  # no class token, patch mean
    "eva02": ("eva02_tiny_patch14_224", {}),  # rotary (cat), q/v biases apart, SwiGLU, patch mean + fc_norm
    "dinov3": ("vit_small_patch16_dinov3", {}),  # rotary (DINOv3), 4 registers, layer scale, dynamic by default
    "pe_core": ("vit_pe_core_tiny_patch16_384", {}),  # rotary attention module, norm_pre, attention pooling
}
# every pooling on a register ViT and on a rotary Eva with registers
POOLED = [("dinov2_reg4", "avg"), ("dinov2_reg4", "map"), ("dinov3", "token"), ("dinov3", "map"), ("eva02", "token")]
CASES = [(f, None) for f in FAMILIES] + POOLED
IDS = [f"{f}-{p or 'default'}" for f, p in CASES]
SMALL = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=2)
N = 16


def build(family: str, pool: str | None = None, **kw) -> dcal.DCAL:
    name, extra = FAMILIES[family]
    args = {**SMALL, **extra, **({"global_pool": pool} if pool else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DINOv3's dynamic_img_size notice (tested below)
        model = dcal.create_model(name, num_classes=5, **{"top_r": 0.25, "pwca_blocks": 3, **args, **kw})
    _perturb(model)
    return model


def _perturb(model: torch.nn.Module) -> None:
    """Random, non-trivial weights everywhere (timm inits layer scale at 1e-5, pooling latents tiny, GLCA as a copy
    of block L): every term of every equation then shows in the outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def images(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def timm_tokens(bb, x):
    """timm's tokens before the blocks, and the rotary phases (Eva), by timm's own modules."""
    t = bb.patch_embed(x)
    if isinstance(bb, Eva):
        t, rope = bb._pos_embed(t)
        return bb.norm_pre(t), rope
    return bb.norm_pre(bb.patch_drop(bb._pos_embed(t))), None


def run_block(bb, i, x, rope):
    blk = bb.blocks[i]
    return blk(x) if rope is None else blk(x, rope=block_rope(bb, rope, i))


def timm_attention_maps(bb, x):
    """S_1..S_L from timm's own non-fused attention (a hook on attn_drop reads the softmax), and x_L."""
    bb = copy.deepcopy(bb).eval()
    maps, hooks = [], []
    for blk in bb.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0].mean(1))))
    with torch.no_grad():
        t, rope = timm_tokens(bb, x)
        for i in range(len(bb.blocks)):
            t = run_block(bb, i, t, rope)
    for h in hooks:
        h.remove()
    return maps, t


def pooled_start(bb, x_last) -> torch.Tensor:
    """r0 per design.md: e0 (token), uniform on the patches (avg), the pooling attention's head-mean probabilities
    (map), written out from the pooling module's weights."""
    B, T, _ = x_last.shape
    P = bb.num_prefix_tokens
    r0 = torch.zeros(B, T)
    if bb.global_pool == "token":
        r0[:, 0] = 1.0
    elif bb.global_pool == "avg":
        r0[:, P:] = 1.0 / (T - P)
    else:
        pool = bb.attn_pool
        reads_prefix = isinstance(bb, Eva) or bb.pool_include_prefix
        tokens = bb.norm(x_last) if reads_prefix else bb.norm(x_last)[:, P:]
        H, d = pool.num_heads, pool.head_dim
        q = pool.q(pool.latent).reshape(1, -1, H, d).transpose(1, 2)
        k = pool.kv(tokens)[..., : H * d].reshape(B, -1, H, d).transpose(1, 2)
        p = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]
        r0[:, (0 if reads_prefix else P):] = p
    return r0


def reference_rollout(bb, x) -> torch.Tensor:
    """r0 Ŝ_L over all T tokens, Ŝ_L = Π (0.5 S_i + 0.5 I) as full matrices (B, N) on the patches."""
    maps, x_last = timm_attention_maps(bb, x)
    T = maps[0].shape[-1]
    eye = torch.eye(T)
    s_hat = eye.expand(x.shape[0], T, T)
    for s in maps:  # Ŝ_L = S̄_L ... S̄_1
        s_hat = (0.5 * s + 0.5 * eye) @ s_hat
    row = torch.bmm(pooled_start(bb, x_last).unsqueeze(1), s_hat).squeeze(1)
    return row[:, bb.num_prefix_tokens:]


# ------------------------------------------------------------------------------------------ the backbone
@pytest.mark.parametrize(("family", "pool"), CASES, ids=IDS)
def test_sa_only_equals_timm_train_and_eval(family, pool):
    model = build(family, pool, glca_blocks=0, pwca_blocks=0)
    x = images()
    for mode in (False, True):
        model.train(mode)
        with torch.no_grad():
            got = model(x)["logits"]["sa"]
            want = model.backbone(x)  # timm's own forward, the same module and weights
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    full = build(family, pool).eval()  # with GLCA and PWCA switched on, SA is still the backbone
    with torch.no_grad():
        torch.testing.assert_close(full(x)["logits"]["sa"], full.backbone(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "pool"), CASES, ids=IDS)
def test_rollout_equals_the_full_matrix_reference_from_the_pooled_row(family, pool):
    model = build(family, pool).eval()
    x = images()
    want = reference_rollout(model.backbone, x)
    torch.testing.assert_close(model.selection_scores(x), want, atol=1e-5, rtol=1e-4)
    with explicit_attention(model):  # the FLOP counter's explicit path
        torch.testing.assert_close(model.selection_scores(x), want, atol=1e-5, rtol=1e-4)
    # training, with and without gradient checkpointing (queries and keys recomputed per block)
    model.train()
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        x0, rope = model._embed(x)
        _, x_last, att = model._sa_stream(x0, rope, need_attn=True)
        torch.testing.assert_close(model._scores(att, x_last, "rollout"), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("family", "pool"), CASES, ids=IDS)
def test_prefix_tokens_are_never_local_queries(family, pool):
    model = build(family, pool, top_r=1.0).eval()  # every patch selected: exactly the N patches, no prefix token
    x = images()
    with torch.no_grad():
        selected = model(x)["selected"]
        assert sorted(selected[0].tolist()) == list(range(N))
        x0, rope = model._embed(x)
        x_prev, _, _ = model._sa_stream(x0, rope, need_attn=False)
        P = model.num_prefix_tokens
        torch.testing.assert_close(model.glca_queries(x_prev, selected), x_prev[:, P:][torch.arange(3)[:, None],
                                                                                           selected])


@pytest.mark.parametrize(("family", "pool"), CASES, ids=IDS)
def test_glca_equals_timm_block_rows_at_the_selected_patches(family, pool):
    """GLCA (Eq. 3) = the GLCA block's self-attention output over all T tokens of x_(L-1), read at the selected
    patches: timm's block forward gives that reference, with every token's own rotary phase."""
    model = build(family, pool).eval()
    bb = model.backbone
    P, x = model.num_prefix_tokens, images()
    with torch.no_grad():
        out = model(x)
        selected = out["selected"]
        t, rope = timm_tokens(bb, x)
        for i in range(len(bb.blocks) - 1):
            t = run_block(bb, i, t, rope)  # x_(L-1) by timm
        glca = model.glca_blocks[0]
        r = block_rope(bb, rope, len(bb.blocks) - 1)
        full = glca(t) if r is None else glca(t, rope=r)
        rows = full[:, P:][torch.arange(3)[:, None], selected]
        torch.testing.assert_close(model._glca_stream(t, selected, rope), rows, atol=1e-5, rtol=1e-5)
        feature = model.glca_fc_norm(model.glca_norm(rows).mean(1))
        torch.testing.assert_close(out["features"]["glca"], feature, atol=1e-5, rtol=1e-5)
        if rope is not None:  # without the queries' own phases the result is another one
            wrong = glca_block(glca, t[:, P:][torch.arange(3)[:, None], selected], t, r, None, 0)
            assert not torch.allclose(wrong, rows, atol=1e-4)


@pytest.mark.parametrize("family", ["dinov2_reg4", "dinov3", "eva02"])
def test_glca_pool_cls_keeps_the_class_token_without_phase(family):
    model = build(family, None, glca_pool="cls").eval()
    bb, P, x = model.backbone, model.num_prefix_tokens, images()
    with torch.no_grad():
        x0, rope = model._embed(x)
        x_prev, x_last, att = model._sa_stream(x0, rope, need_attn=True)
        selected = model._select(att, x_last)
        r = block_rope(bb, rope, len(bb.blocks) - 1)
        glca = model.glca_blocks[0]
        full = glca(x_prev) if r is None else glca(x_prev, rope=r)
        want = torch.cat([full[:, :1], full[:, P:][torch.arange(3)[:, None], selected]], dim=1)
        torch.testing.assert_close(model._glca_stream(x_prev, selected, rope), want, atol=1e-5, rtol=1e-5)


def reference_pwca(blk, x, pairs, rope):
    """Eq. 4 written out: queries of each image against [its T keys; the distractor's T keys] (rotary phases on
    both images' patches), one softmax over 2T; timm's block finishes."""
    attn = blk.attn
    h = blk.norm1(x)
    B, T, D = h.shape
    H, d = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if getattr(attn, "q_bias", None) is not None \
            else attn.qkv.bias
        q, k, v = F.linear(h, attn.qkv.weight, bias).reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = (getattr(attn, f"{n}_proj")(h).reshape(B, T, H, d).transpose(1, 2) for n in "qkv")
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], 2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], 2)
    keys, values = torch.cat([k, k[pairs]], 2), torch.cat([v, v[pairs]], 2)
    o = ((q * attn.scale) @ keys.transpose(-2, -1)).softmax(-1) @ values
    o = attn.proj(attn.norm(o.transpose(1, 2).reshape(B, T, H * d)))
    ls1 = blk.ls1 if hasattr(blk, "ls1") else (lambda t: t if blk.gamma_1 is None else blk.gamma_1 * t)
    ls2 = blk.ls2 if hasattr(blk, "ls2") else (lambda t: t if blk.gamma_2 is None else blk.gamma_2 * t)
    x = x + ls1(o)
    return x + ls2(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize(("family", "pool"), CASES, ids=IDS)
def test_pwca_self_pairs_equal_sa_and_real_pairs_differ_at_every_layer(family, pool):
    model = build(family, pool).train()
    bb, x = model.backbone, images(4)
    with torch.no_grad():
        t, rope = timm_tokens(bb, x)
        self_pairs, real = torch.arange(4), torch.tensor([1, 2, 3, 0])
        for i, blk in enumerate(bb.blocks):
            r = block_rope(bb, rope, i)
            sa = run_block(bb, i, t, rope)
            torch.testing.assert_close(pwca_block(blk, t, self_pairs, False, r), sa, atol=1e-5, rtol=1e-5)
            paired = pwca_block(blk, t, real, False, r)
            torch.testing.assert_close(paired, reference_pwca(blk, t, real, r), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(paired, sa, atol=1e-4)
            t = sa
        out = model(x, pairs=self_pairs)
        torch.testing.assert_close(out["features"]["pwca"], out["features"]["sa"], atol=1e-5, rtol=1e-5)
        share = model.pwca_attention(x, self_pairs)
        n = share[0].shape[1] // 2
        for row in share:  # registers and class token of the "distractor" included: exactly half the attention
            torch.testing.assert_close(row[:, n:].sum(-1), torch.full((4,), 0.5), atol=1e-5, rtol=0)


def test_fused_and_eager_rollout_agree_with_registers(monkeypatch):
    from dcal.model import fused_rollout

    if not fused_rollout.available():
        pytest.skip(f"the fused rollout kernel is unavailable here: {fused_rollout.why_unavailable()}")
    model = build("dinov2_reg4").eval()
    x = images()
    fused = model.selection_scores(x)
    monkeypatch.setattr(fused_rollout, "_load", lambda: "turned off by the test")
    torch.testing.assert_close(model.selection_scores(x), fused, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ construction
def test_dynamic_image_size_is_turned_off_and_said():
    with pytest.warns(UserWarning, match="dynamic_img_size=False"):
        model = dcal.create_model("vit_small_patch16_dinov3", num_classes=2, pwca_blocks=1, **SMALL)
    assert model.backbone.dynamic_img_size is False and model.num_patches == N
    with pytest.raises(ValueError, match="dynamic_img_size=True is not supported"):
        dcal.create_model("vit_small_patch16_dinov3", num_classes=2, dynamic_img_size=True, **SMALL)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"global_pool": "avgmax"}, "global_pool='avgmax' is not supported"),
    ({"patch_drop_rate": 0.5}, "patch dropout"),
])
def test_unsupported_variants_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        dcal.create_model("vit_small_patch14_reg4_dinov2", num_classes=2, pwca_blocks=1, **SMALL, **kwargs)
    assert "\n" not in str(err.value)


def test_other_architectures_are_refused_naming_what_dcal_needs():
    with pytest.raises(TypeError, match="VisionTransformer or Eva"):
        dcal.create_model("resnet18", num_classes=2, pwca_blocks=1)
    with pytest.raises(ValueError, match="patch_stride is supported for timm VisionTransformer"):
        dcal.create_model("eva02_tiny_patch14_224", num_classes=2, pwca_blocks=1, patch_stride=6, **SMALL)


@pytest.mark.parametrize("family", ["dinov3", "siglip_map"])
def test_build_details_live_in_the_model_and_rebuild_it(family):
    model = build(family)
    cfg = model_config(model)
    assert cfg["backbone"] == FAMILIES[family][0] and cfg["img_size"] == 32 and cfg["depth"] == 3
    kwargs = {k: v for k, v in cfg.items() if k not in ("backbone",)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = dcal.create_model(cfg["backbone"], **kwargs)
    again.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x)["logits"]["glca"], model.eval()(x)["logits"]["glca"])


def test_rotary_phases_of_selected_patches_are_gathered_per_image():
    rope = torch.randn(16, 8)
    selected = torch.tensor([[3, 0], [15, 7]])
    got = gather_rope(rope, selected)
    assert got.shape == (2, 1, 2, 8)
    torch.testing.assert_close(got[1, 0, 0], rope[15])
    per_head = torch.randn(2, 16, 8)  # (H, N, 2d): per-head phases (Eva's 'mixed' rope)
    got = gather_rope(per_head, selected)
    assert got.shape == (2, 2, 2, 8)
    torch.testing.assert_close(got[1, 0, 1], per_head[0, 7])
