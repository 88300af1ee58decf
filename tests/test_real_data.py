"""Short training runs on the real images in ../shared/data (see its README): the pipeline learns."""

from __future__ import annotations

import json

import torch

from dcal.config import load_config
from dcal.engine import build_datasets, build_model, evaluate, fit
from tests.helpers import SHARED_DATA, needs_shared

SMALL_VIT = [
    "model.backbone=deit_tiny_patch16_224",
    "model.timm_kwargs={depth: 4, embed_dim: 96, num_heads: 3, patch_size: 8}",
    "model.pwca_blocks=4",
    "model.drop_path_rate=0.0",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.25,0.25,0.25]",
    "train.workers=2",
]


@needs_shared
def test_cub100_short_run_is_clearly_above_chance(tmp_path):
    """100 bird species (chance 1%), a small ViT from scratch, 2 epochs at 64x64: well above chance."""
    cfg = load_config(None, [
        "data.dataset=cub", f"data.root={SHARED_DATA / 'cub100'}", "data.resize=72", "model.img_size=64",
        *SMALL_VIT, "train.epochs=2", "train.eval_every=2", "train.batch_size=32", "train.base_lr=0.016",
        f"output_dir={tmp_path / 'cub'}",
    ])
    final = fit(cfg)
    assert final["top1"] >= 2.5, final  # >= 2.5x chance: about 8 standard deviations above it on 2,999 images


@needs_shared
def test_mars_mini_short_run_improves_map_over_untrained(tmp_path):
    """16 training identities (P x K = 4 x 4); mAP of the trained model beats the untrained one."""
    overrides = [
        "data.dataset=market1501", f"data.root={SHARED_DATA / 'mars_reid_mini'}", "data.resize=null",
        "model.img_size=[64,32]", *SMALL_VIT, "train.epochs=6", "train.eval_every=6", "train.batch_size=16",
        "train.num_instances=4", "train.optimizer=sgd", "train.lr=0.03", "train.weight_decay=1e-4",
        "train.warmup_epochs=1", f"output_dir={tmp_path / 'mars'}",
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    sets = build_datasets(cfg, train=True)
    untrained = evaluate(build_model(cfg, sets["train"].num_classes), sets, torch.device("cpu"), cfg)
    final = fit(cfg)
    records = [json.loads(x) for x in (tmp_path / "mars" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final"]
    assert final["mAP"] > untrained["mAP"] + 2.0, (untrained, final)
