"""``model.glca_pool`` and ``model.patch_stride`` travel with every saved config."""

from __future__ import annotations

import logging

import yaml

from dcal.checkpoint import export_weights
from dcal.config import load_config, to_yaml
from dcal.engine import build_model
from dcal.loading import load_model
from tests.helpers import TINY_TIMM_KWARGS

TINY = [
    "data.dataset=synthetic",
    "model.img_size=32",
    TINY_TIMM_KWARGS,
    "model.pwca_blocks=2",
]


def test_keys_reach_the_model_and_the_saved_config():
    cfg = load_config(None, [*TINY, "model.glca_pool=cls", "model.patch_stride=6"])
    model = build_model(cfg, 3)
    assert model.cfg.glca_pool == "cls" and model.patch_stride == 6 and model.num_patches == 25  # (32-8)//6+1 = 5
    saved = yaml.safe_load(to_yaml(cfg))["model"]
    assert saved["glca_pool"] == "cls" and saved["patch_stride"] == 6
    assert load_config(None, TINY).model.glca_pool == "mean"


def test_checkpoint_with_glca_pool_loads_silently(tmp_path, caplog):
    cfg = load_config(None, TINY)
    path = tmp_path / "new.safetensors"
    export_weights(path, build_model(cfg, 3), to_yaml(cfg))
    with caplog.at_level(logging.WARNING, logger="dcal.config"):
        loaded_cfg = load_model(checkpoint=path).cfg
    assert loaded_cfg.model.glca_pool == "mean" and not [r for r in caplog.records if r.name == "dcal.config"]
