"""Loading timm-format checkpoints through ``pretrained_file``: resampled position embeddings, classifier dropped."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from tests.helpers import TINY_ARCH, tiny_model


@pytest.fixture
def source():
    """A 'pre-trained' timm DeiT at 224 with a 1000-class head, weights randomised away from the init."""
    model = timm.create_model("deit_tiny_patch16_224", num_classes=1000, **TINY_ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "pth_wrapped"])
@pytest.mark.parametrize("img_size", [448, (64, 32)])
def test_pretrained_file_loads_with_resampled_pos_embed_and_no_classifier(tmp_path, source, fmt, img_size):
    state = source.state_dict()
    path = tmp_path / f"ckpt.{fmt.split('_')[0]}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth_wrapped":
        torch.save({"model": state, "epoch": 3}, path)  # DeiT's own checkpoint layout
    else:
        torch.save(state, path)
    model = tiny_model(num_classes=7, img_size=img_size, pretrained_file=path, pwca_blocks=2)
    bb = model.backbone
    torch.testing.assert_close(bb.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(bb.cls_token, source.cls_token)
    grid = bb.patch_embed.grid_size
    expected_pos = resample_abs_pos_embed(state["pos_embed"], new_size=grid, num_prefix_tokens=1)
    torch.testing.assert_close(bb.pos_embed, expected_pos)
    assert bb.head.weight.shape == (7, 48)
    # GLCA starts as a copy of the *loaded* last block, not of a random one
    torch.testing.assert_close(model.glca_blocks[0].attn.qkv.weight, source.blocks[-1].attn.qkv.weight)


def test_dcal_export_loads_as_backbone(tmp_path, source):
    trained = tiny_model(num_classes=3, pwca_blocks=2)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "dcal.safetensors"))
    model = tiny_model(num_classes=3, pretrained_file=tmp_path / "dcal.safetensors", pwca_blocks=2)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight, trained.backbone.blocks[0].attn.qkv.weight)


def test_missing_or_mismatched_checkpoint_errors_name_the_file(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny_model(num_classes=2, pretrained_file=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*missing keys"):
        tiny_model(num_classes=2, pretrained_file=bad, pwca_blocks=2)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        tiny_model(num_classes=2, pretrained_file=garbage, pwca_blocks=2)


def test_pretrained_true_uses_timm_hub_mechanism(monkeypatch):
    """pretrained=True is handed to timm.create_model with the hub tag; nothing is downloaded here."""
    seen = {}
    real_create = timm.create_model

    def recording_create(name, **kw):
        seen.update(kw, name=name)
        return real_create(name, **{**kw, "pretrained": False})

    monkeypatch.setattr(timm, "create_model", recording_create)
    tiny_model(backbone="vit_base_patch16_224.augreg_in21k", num_classes=2, pretrained=True, depth=1)
    assert seen["pretrained"] is True and seen["name"] == "vit_base_patch16_224.augreg_in21k"
