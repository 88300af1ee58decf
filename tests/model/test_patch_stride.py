"""TransReID's overlapping patch embedding (docs/design.md, Overlapping patches): grid, weight loading, SA-only
equals a reference."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from dcal.model.dcal import set_patch_stride
from tests.helpers import TINY_ARCH, tiny_model


@pytest.mark.parametrize("size, grid", [((256, 128), (21, 10)), ((256, 256), (21, 21)), ((64, 32), (5, 2))])
def test_stride_12_grid(size, grid):
    model = tiny_model(task="reid", num_classes=4, img_size=size, patch_stride=12, pwca_blocks=2)
    n = grid[0] * grid[1]
    assert model.backbone.patch_embed.grid_size == grid and model.num_patches == n
    assert model.backbone.pos_embed.shape == (1, n + 1, 48)
    assert model.num_local_queries == -(-3 * n // 10)  # ⌈0.3·N⌉ of the overlapping patches
    out = model.eval()(torch.randn(2, 3, *size))
    assert out["features"]["sa"].shape == (2, 48)


def reference_sa(vit, x, stride):
    """The plain ViT forward with the patch conv applied at ``stride`` (written out, not timm's PatchEmbed)."""
    w, b = vit.patch_embed.proj.weight, vit.patch_embed.proj.bias
    tokens = F.conv2d(x, w, b, stride=stride).flatten(2).transpose(1, 2)
    h = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + vit.pos_embed
    for blk in vit.blocks:
        h = blk(h)
    return vit.head(vit.norm(h)[:, 0])


def test_sa_only_equals_a_strided_reference():
    model = tiny_model(num_classes=5, img_size=(64, 32), patch_stride=12, glca_blocks=0, pwca_blocks=0).eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"]["sa"], reference_sa(model.backbone, x, 12), atol=1e-5, rtol=0)


@pytest.fixture
def stride16_checkpoint(tmp_path):
    """A 'pre-trained' non-overlapping ViT at 224 (14x14 grid), weights moved away from the init."""
    src = timm.create_model("deit_tiny_patch16_224", num_classes=1000, **TINY_ARCH)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "vit16.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return src, path


def check_loaded(model, src):
    bb = model.backbone
    torch.testing.assert_close(bb.patch_embed.proj.weight, src.patch_embed.proj.weight)  # the 16x16 kernel kept
    assert bb.patch_embed.proj.stride == (12, 12)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(21, 10), old_size=(14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(bb.pos_embed, expected)  # resampled once, straight to the overlapping grid
    torch.testing.assert_close(bb.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)


def test_stride_12_loads_a_stride_16_checkpoint_file(stride16_checkpoint):
    src, path = stride16_checkpoint
    model = tiny_model(task="reid", num_classes=4, img_size=(256, 128), patch_stride=12, pretrained_file=path,
                       pwca_blocks=2)
    check_loaded(model, src)


def test_stride_12_through_timms_pretrained_loading(stride16_checkpoint, monkeypatch):
    """``pretrained=True`` goes through timm's own hub loader (its download replaced by the local checkpoint:
    no network here; ``pretrained_cfg_overlay``, which could point timm at a file, is refused by dcal) after the
    stride is set."""
    import timm.models._builder as builder
    from safetensors.torch import load_file

    src, path = stride16_checkpoint
    asked = []
    monkeypatch.setattr(builder, "load_state_dict_from_hf",
                        lambda loc, *a, **k: asked.append(loc) or load_file(str(path)))
    model = tiny_model(task="reid", num_classes=4, img_size=(256, 128), patch_stride=12, pretrained=True,
                       pwca_blocks=2)
    assert asked and "deit_tiny_patch16_224" in str(asked[0])
    check_loaded(model, src)


def test_bad_stride_is_refused():
    vit = timm.create_model("deit_tiny_patch16_224", num_classes=0, img_size=64, **TINY_ARCH)
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match="patch_stride"):
            set_patch_stride(vit, bad)
