"""Pretraining as a step (``dcal.pretrain``): trained once, reused, resumed, refused when stale; fine-tuning
starts from its last epoch's backbone; ablations name it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcal.ablation import run_ablation
from dcal.config import load_config
from dcal.engine.build import build_model
from dcal.pretrain import describe_backbone, ensure_pretrained, pretrain_config, resolve_pretrain
from dcal.run_folder import backbone_weights
from tests.helpers import logged

DATA = ("data: {dataset: synthetic, root: unused, resize: 36, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], "
        "synthetic_num_classes: 3, synthetic_train_per_class: 6, synthetic_test_per_class: 2, "
        "synthetic_image_size: 32}\n")
MODEL = "model: {img_size: 32, timm_kwargs: {depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}, pwca_blocks: 2"
PRETRAIN = DATA + MODEL + "}\ntrain: {epochs: 2, batch_size: 6, workers: 0, seed: 5}\n"


@pytest.fixture
def recipes(tmp_path):
    pre = tmp_path / "pre.yaml"
    pre.write_text(PRETRAIN)
    fine = tmp_path / "fine.yaml"
    fine.write_text(DATA + MODEL + f", pretrain: {pre}}}\ntrain: {{epochs: 1, batch_size: 6, workers: 0}}\n")
    return pre, fine


def test_pretraining_is_sa_only_and_reused(recipes, tmp_path):
    pre, _ = recipes
    cfg = pretrain_config(pre, tmp_path / "cache")
    assert (cfg.model.glca_blocks, cfg.model.pwca_blocks, cfg.eval.fusion) == (0, 0, "sa")
    with logged("dcal.pretrain") as lines:
        run = ensure_pretrained(cfg)
    assert "training" in lines[-1]
    stamp = (run / "last.pth").stat().st_mtime_ns
    with logged("dcal.pretrain") as lines:
        assert ensure_pretrained(pretrain_config(pre, tmp_path / "cache")) == run
    assert "reusing" in lines[-1] and (run / "last.pth").stat().st_mtime_ns == stamp
    # a changed recipe is refused, naming what changed, and the cached run is left as it was
    with pytest.raises(FileExistsError, match=r"train.epochs: 2 -> 3"):
        ensure_pretrained(pretrain_config(pre, tmp_path / "cache", ["train.epochs=3"]))
    assert (run / "last.pth").stat().st_mtime_ns == stamp


def test_interrupted_pretraining_is_resumed(recipes, tmp_path):
    pre, _ = recipes
    run = ensure_pretrained(pretrain_config(pre, tmp_path / "cache"))
    # as if killed after epoch 1: the final record and the exports are not there yet
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1]) + "\n")
    (run / "last.safetensors").unlink()
    with logged("dcal.pretrain") as out:
        ensure_pretrained(pretrain_config(pre, tmp_path / "cache"))
    assert "resuming" in out[-1] and (run / "last.safetensors").is_file()


def test_finetuning_starts_from_the_last_epoch_backbone(recipes, tmp_path):
    _, fine = recipes
    cfg = resolve_pretrain(load_config(fine, [f"output_dir={tmp_path / 'runs' / 'ft'}"]))
    run = tmp_path / "runs" / "pretrain" / "pre"
    assert cfg.model.pretrain is None and cfg.model.pretrained_file == str(run)
    model = build_model(load_config(fine, ["model.pretrain=null", f"model.pretrained_file={run}"]), 7)
    saved = load_file(str(run / "last.safetensors"))
    for k, v in model.backbone.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, saved[f"backbone.{k}"]), k
    assert "pretrained SA-only by dcal" in describe_backbone(dict(cfg.model))
    assert "from scratch" in describe_backbone({"backbone": "x", "pretrained_file": None})


def test_pretrained_file_folder_without_export_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="without last.safetensors"):
        backbone_weights(tmp_path)


def test_ablation_fine_tunes_every_variant_from_one_backbone(recipes, tmp_path):
    _, fine = recipes
    out = tmp_path / "abl"
    with logged("dcal.ablation") as lines:
        summary = run_ablation(fine, ["table3"], seeds=2, output_dir=out)
    folder = tmp_path / "pretrain" / "pre"
    assert lines[0].startswith(f"pretrained backbone: {folder}")
    for row in summary["rows"]:
        for r in row["runs"]:
            saved = load_config(Path(r["run_dir"]) / "config.yaml")
            assert saved.model.pretrained_file == str(folder) and saved.model.pretrain is None
    assert "pretrained SA-only by dcal" in (out / "ablation.md").read_text()
    # a second ablation naming the same recipe reuses the backbone
    run_ablation(fine, ["table3"], seeds=1, output_dir=tmp_path / "abl2")
    assert (folder / "train.log").read_text().count("reusing") == 1
