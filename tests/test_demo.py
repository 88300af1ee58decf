"""dcal demo: both stages at a tiny size, the second run reuses every run, a stale config is refused with the way
out, --fresh removes the demo's own runs and nothing else; its configs match configs/demo*.yaml."""

from __future__ import annotations

import json

import yaml

from dcal.cli import main
from dcal.config import to_yaml
from dcal.demo import MADE_BY, demo_config, demo_pretrain_config, remove_demo_runs
from dcal.run_folder import claim_folder
from tests.helpers import TINY_TIMM_KWARGS

# a 2-block ViT on 60 + 60 generated 32-pixel images, one epoch per stage
TINY = ["train.epochs=1", "data.synthetic_train_per_class=10", "data.synthetic_test_per_class=4",
        "data.synthetic_image_size=32", "data.resize=36", "model.img_size=32",
        TINY_TIMM_KWARGS, "model.pwca_blocks=2"]


def test_demo_stage_configs():
    pre = demo_pretrain_config("runs/x", TINY)
    assert (pre.data.synthetic_task, pre.model.glca_blocks, pre.model.pwca_blocks) == ("coarse", 0, 0)
    assert pre.output_dir == "runs/x/pretrain"
    sa, dc = demo_config("runs/x", "sa_only", TINY), demo_config("runs/x", "dcal", TINY)
    for cfg in (sa, dc):
        assert cfg.data.synthetic_task == "mark" and cfg.model.pretrained_file == "runs/x/pretrain"
    assert (sa.model.glca_blocks, sa.model.pwca_blocks, dc.model.glca_blocks, dc.model.pwca_blocks) == (0, 0, 1, 2)
    # one recipe: the variants differ in the blocks (and SA-only's fusion) only
    same = {k for k in dc.train if sa.train[k] != dc.train[k]}
    assert not same and sa.data == dc.data and pre.train == dc.train


def test_demo_trains_then_reuses_then_refuses_a_stale_config(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), *TINY]) == 0
    first = capsys.readouterr().out
    assert "training the SA-only run" in first and "SA only" in first and "GLCA branch" in first
    assert "mechanism (first 24 test images): mark hit of the top-R patches" in first and "PWCA share" in first
    summary = json.loads((out / "summary.json").read_text())
    assert {"top1", "top1_sa", "mark_hit_rollout"} <= set(summary["sa_only"]) and "pwca_share" in summary["dcal"]
    assert (out / "rollout.png").stat().st_size > 1000
    metrics = {v: (out / v / "metrics.jsonl").read_text() for v in ("pretrain", "sa_only", "dcal")}

    assert main(["demo", "--output-dir", str(out), *TINY]) == 0
    second = capsys.readouterr().out
    assert "pretrained backbone: reusing" in second and second.count("already finished") == 2
    assert "fgvc:" not in second  # nothing trained
    assert {v: (out / v / "metrics.jsonl").read_text() for v in metrics} == metrics

    assert main(["demo", "--output-dir", str(out), *TINY, "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 -> 2" in err and "dcal demo --fresh" in err


def test_fresh_removes_the_demo_runs_only(tmp_path):
    """--fresh removes what the demo wrote (its marked run folders, its picture and summary) and nothing else: a
    user's file put into a demo run folder stays, with that folder."""
    from dcal.demo import PICTURE, SUMMARY
    from dcal.visualize import new_figure, save_figure

    for name in ("pretrain", "sa_only", "dcal"):
        assert claim_folder(tmp_path / name, MADE_BY, name)
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "dcal" / "my_notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    fig, _ = new_figure(1, 1, (2.0, 2.0))
    save_figure(fig, tmp_path / PICTURE)
    (tmp_path / SUMMARY).write_text(json.dumps({"written_by": MADE_BY}))
    removed = remove_demo_runs(tmp_path)
    assert sorted(p.name for p in removed) == ["dcal", "pretrain", "rollout.png", "sa_only", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcal", "mine", "notes.txt"]
    assert sorted(p.name for p in (tmp_path / "dcal").iterdir()) == [".dcal-folder.json", "my_notes.txt"]


def test_a_stale_run_is_refused_before_training(tmp_path, capsys):
    """A pretraining folder of another config stops the demo at once, naming the key and --fresh."""
    cfg = demo_pretrain_config(tmp_path, TINY)
    saved = yaml.safe_load(to_yaml(cfg))
    saved["train"]["seed"] = 7
    claim_folder(tmp_path / "pretrain", MADE_BY, "pretrain")  # the demo's own folder, from an earlier demo
    (tmp_path / "pretrain" / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "pretrain" / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')  # it trained: keep it
    assert main(["demo", "--output-dir", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "train.seed: 7 -> 0" in err and "dcal demo --fresh" in err
    assert sorted(p.name for p in (tmp_path / "pretrain").iterdir()) == [".dcal-folder.json", "config.yaml",
                                                                         "metrics.jsonl"]
