"""CLI smoke tests: train 1 epoch on tiny fixtures, eval, exact resume, clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dcal.run_folder
from dcal.cli import main
from tests.helpers import TINY_TIMM_KWARGS, write_images

TINY_MODEL = [
    "model.backbone=deit_tiny_patch16_224",
    "model.img_size=32",
    TINY_TIMM_KWARGS,
    "model.pwca_blocks=2",
    "model.drop_path_rate=0.1",
    "train.workers=0",
    "train.log_every=1",
]


@pytest.fixture
def folder_data(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in ("alpha", "beta", "gamma"):
            write_images(tmp_path / "data" / split / c, [f"img{i}.png" for i in range(n)], rng)
    return tmp_path / "data"


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  dataset: folder\n  resize: 40\ntrain:\n  batch_size: 6\n  epochs: 2\n")
    return path


def train_args(recipe, data, out, *extra):
    return ["train", "--config", str(recipe), f"data.root={data}", f"output_dir={out}", *TINY_MODEL, *extra]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "dcal.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "eval", "demo", "visualize", "complexity", "predict", "embed", "search", "export", "report"):
        assert cmd in out.stdout


def test_train_eval_and_outputs(folder_data, recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(recipe, folder_data, out, "train.epochs=1")) == 0
    for name in ("config.yaml", "metrics.jsonl", "last.pth", "best.pth", "best.safetensors", "last.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final"] is True
    for key in ("epoch", "loss", "lr", "top1", "top1_sa", "top1_glca", "loss_pwca", "weight_sa", "images_per_s"):
        assert key in records[0], key
    state = torch.load(out / "last.pth", weights_only=False)
    for key in ("model", "optimizer", "scheduler", "criterion", "epoch", "rng", "config"):
        assert key in state
    assert set(state["criterion"]) == {"log_vars.sa", "log_vars.glca", "log_vars.pwca"}
    capsys.readouterr()
    assert main(["eval", "--run", str(out), f"data.root={folder_data}", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["top1"] == pytest.approx(records[0]["top1"])
    assert main(["eval", "--checkpoint", str(out / "last.pth"), f"data.root={folder_data}"]) == 0
    assert main(["visualize", "--run", str(out), f"data.root={folder_data}", "--num-images", "3"]) == 0
    assert (out / "rollout.png").stat().st_size > 1000


def test_resume_continues_exactly(folder_data, recipe, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(train_args(recipe, folder_data, straight)) == 0

    resumed = tmp_path / "resumed"
    real_append = dcal.run_folder.append_metrics

    def interrupt_after_first_epoch(path, record):
        real_append(path, record)
        if record.get("epoch") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(dcal.run_folder, "append_metrics", interrupt_after_first_epoch)
    assert main(train_args(recipe, folder_data, resumed)) == 130
    monkeypatch.setattr(dcal.run_folder, "append_metrics", real_append)
    assert main(train_args(recipe, folder_data, resumed)) == 2  # the run exists: refuse to overwrite it
    assert main(train_args(recipe, folder_data, resumed, "--resume")) == 0

    a, b = load_file(straight / "last.safetensors"), load_file(resumed / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    ra = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == [r["epoch"] for r in ra]
    assert rb[1]["loss"] == pytest.approx(ra[1]["loss"], rel=1e-5)


def test_config_and_layout_errors_are_one_clear_line(folder_data, recipe, tmp_path, capsys):
    assert main(train_args(recipe, folder_data, tmp_path / "x", "train.lr_rate=0.1")) == 2
    err = capsys.readouterr().err
    assert "train.lr_rate" in err and "train.lr" in err
    assert main(train_args(recipe, tmp_path / "missing", tmp_path / "y")) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # nothing written before the data is known good


def test_reid_train_and_eval(market_data, tmp_path):
    recipe = tmp_path / "reid.yaml"
    recipe.write_text("data:\n  dataset: market1501\n  resize: null\ntrain:\n  batch_size: 8\n  num_instances: 4\n"
                      "  epochs: 1\n  optimizer: sgd\n  lr: 0.008\n  weight_decay: 1.0e-4\n")
    out = tmp_path / "reid_run"
    args = ["train", "--config", str(recipe), f"data.root={market_data}", f"output_dir={out}", *TINY_MODEL,
            "model.img_size=[32,16]", TINY_TIMM_KWARGS]
    assert main(args) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert 0.0 <= record[key] <= 100.0, key
    assert main(["eval", "--run", str(out), f"data.root={market_data}", "eval.flip=true",
                 "eval.reid_feature=after_bn"]) == 0


@pytest.mark.parametrize("option", ["train.amp=bf16", "train.grad_checkpointing=true", "loss.weighting=fixed"])
def test_speed_and_ablation_switches_train(folder_data, recipe, tmp_path, option):
    out = tmp_path / "opt"
    assert main(train_args(recipe, folder_data, out, "train.epochs=1", option)) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["loss"]) and 0.0 <= record["top1"] <= 100.0


def test_fp16_on_cpu_is_refused_clearly(folder_data, recipe, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    assert main(train_args(recipe, folder_data, tmp_path / "fp16", "train.amp=fp16")) == 2
    assert "bf16" in capsys.readouterr().err


def _subparsers():
    from dcal.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_help_shows_its_default():
    for name, p in _subparsers().items():
        formatter = p._get_formatter()
        in_required_group = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in p._actions:
            if not action.option_strings or action.required or action in in_required_group:
                continue
            if action.dest in ("help",):
                continue
            text = formatter._get_help_string(action) or ""
            assert "default" in text, f"dcal {name} {action.option_strings[0]}: help {text!r} names no default"


def test_threads_is_offered_by_the_computing_commands_and_sets_torch():
    commands = _subparsers()
    for name in ("train", "eval", "demo", "visualize", "predict", "embed", "search", "export", "ablation"):
        assert any("--threads" in a.option_strings for a in commands[name]._actions), name
    from dcal.cli import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # unset: torch's own setting is left alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bad_option_values_and_missing_run_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--checkpoint", "x.pth", "img.png", "--topk", "0"])
    assert e.value.code == 2 and "expects an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--run", "x", "--threads", "0"])
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err and "holds no checkpoint" not in err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--run", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_recipes_lists_prints_and_copies_out(tmp_path, capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "fgvc/cub_deit_tiny" in listed and "reid/market1501_deit_tiny" in listed
    assert main(["recipes", "fgvc/cub_deit_tiny"]) == 0
    assert "dcal train --config configs/fgvc/cub_deit_tiny.yaml" in capsys.readouterr().out
    assert main(["recipes", "fgvc/cub_deit_tiny", "--copy", str(tmp_path / "mine")]) == 0
    copied = tmp_path / "mine" / "cub_deit_tiny.yaml"
    assert "wrote" in capsys.readouterr().out and copied.is_file()
    assert main(["recipes", "fgvc/cub_deit_tiny", "--copy", str(tmp_path / "mine")]) == 2  # never replaced
    assert "already exists" in capsys.readouterr().err
    assert main(["recipes", "fgvc/nope"]) == 2


def test_library_errors_name_arguments_and_cli_errors_name_flags(tmp_path, capsys):
    """The same bad value is said in the terms of whoever gave it: an argument to a function, a flag to dcal."""
    from dcal.ablation import run_ablation
    from dcal.gallery.index import build_index

    with pytest.raises(ValueError, match=r"^seeds must be >= 1, got 0$"):
        run_ablation("demo", ["table3"], seeds=0, output_dir=tmp_path / "abl")
    with pytest.raises(SystemExit):
        main(["ablation", "--config", "demo", "--seeds", "0"])
    assert "--seeds: expects an int >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^backend='nope': expected one of"):
        build_index(tmp_path / "index", [object()], backend="nope")
    with pytest.raises(ValueError, match=r"^metric='nope': expected one of"):
        build_index(tmp_path / "index", [object()], metric="nope")
    assert not (tmp_path / "abl").exists() and not (tmp_path / "index").exists()
