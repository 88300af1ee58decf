"""Bad input gets a clear answer and loses nothing: unreadable images, non-finite losses, checkpoints of another
model or with code in them, out-of-range config values."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcal.cli import main
from dcal.losses import DCALLoss, LossOutput

TINY = ["model.img_size=32", "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}",
        "model.pwca_blocks=2", "train.workers=0", "train.device=cpu"]
CLASSES = ("alpha", "beta", "gamma")


def write_folder(root: Path, train_per_class: int = 6, test_per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BAD_FILES = {  # name -> content: zero-byte, not an image, truncated, corrupt
    "alpha/zero.png": b"",
    "beta/notes.jpg": b"these are my notes, not a picture\n",
    "gamma/cut.png": png_bytes()[:60],
    "alpha/corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
}


def train_args(data: Path, out: Path, *extra: str, batch: int = 11, epochs: int = 1) -> list[str]:
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(f"data:\n  dataset: folder\n  resize: 40\n  root: {data}\ntrain:\n  batch_size: {batch}\n"
                      f"  epochs: {epochs}\n")
    flags = [e for e in extra if e.startswith("--")]  # after the overrides: argparse does not interleave them
    return ["train", "--config", str(recipe), f"output_dir={out}", *TINY, *(e for e in extra if e not in flags), *flags]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run on a clean folder set (shared by the tests that must not damage it)."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_folder(tmp / "data")
    out = tmp / "run"
    assert main(train_args(data, out, batch=6)) == 0
    return data, out


def snapshot(out: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in out.iterdir() if p.suffix in (".pth", ".safetensors")}


def warned(caplog) -> list[str]:
    """The warnings dcal logged (the commands print them on stderr)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("dcal.")]


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, caplog):
    data = write_folder(tmp_path / "data")
    for name, content in {**BAD_FILES, "../test/beta/empty.png": b""}.items():
        (data / "train" / name).write_bytes(content)
    out = tmp_path / "run"
    assert main(train_args(data, out)) == 0  # 22 files, batch 11: every file is drawn once
    said = " ".join(warned(caplog))
    for name in BAD_FILES:
        assert str(data / "train" / name) in said, name
    assert str(data / "test" / "beta" / "empty.png") in said
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["bad_images"] == 4 and record["eval_bad_images"] == 1
    assert 0.0 <= record["top1"] <= 100.0


def test_on_bad_image_error_stops_naming_the_file(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    (data / "train" / "beta" / "notes.jpg").write_bytes(BAD_FILES["beta/notes.jpg"])
    assert main(train_args(data, tmp_path / "run", "data.on_bad_image=error")) == 2
    err = capsys.readouterr().err
    assert str(data / "train" / "beta" / "notes.jpg") in err and "on_bad_image=skip" in err


def test_a_mostly_broken_folder_stops_and_keeps_the_run(tmp_path, capsys, caplog):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_args(data, out, batch=6)) == 0
    kept = snapshot(out)
    for i, p in enumerate(sorted((data / "train").rglob("*.png"))):
        if i % 4:  # 3 of 4 files become garbage
            p.write_bytes(b"garbage")
    capsys.readouterr()
    assert main(train_args(data, out, "--resume", batch=6, epochs=2)) == 2
    assert warned(caplog) and "looks broken" in capsys.readouterr().err
    assert snapshot(out) == kept


def nan_after(monkeypatch, bad_calls):
    """Make the loss NaN on the given (1-based) calls."""
    real, calls = DCALLoss.forward, [0]

    def forward(self, out, targets):
        calls[0] += 1
        res = real(self, out, targets)
        return LossOutput(res.total * float("nan"), res.per_branch, res.weights) if bad_calls(calls[0]) else res

    monkeypatch.setattr(DCALLoss, "forward", forward)


def test_a_non_finite_loss_is_not_applied(tmp_path, monkeypatch, caplog):
    data = write_folder(tmp_path / "data")
    nan_after(monkeypatch, lambda n: n == 2)
    out = tmp_path / "run"
    assert main(train_args(data, out, batch=3)) == 0
    assert any("non-finite loss at epoch 1, step 2" in line for line in warned(caplog))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["bad_steps"] == 1 and np.isfinite(record["loss"])


def test_non_finite_losses_in_a_row_stop_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                              caplog):
    data = write_folder(tmp_path / "data")
    nan_after(monkeypatch, lambda n: n >= 3)
    out = tmp_path / "run"
    assert main(train_args(data, out, "train.max_bad_steps=2", "train.save_every_steps=1", batch=3)) == 2
    assert warned(caplog)
    err = capsys.readouterr().err
    assert "non-finite for 2 steps in a row (last at epoch 1, step 4)" in err and str(out / "last.pth") in err
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["progress_per_rank"][0]["steps"] == 2  # steps 1 and 2 applied, 3 skipped, 4 stopped the run
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_checkpoint_of_another_model_lists_the_mismatches(trained, capsys):
    data, out = trained
    kept = snapshot(out)
    assert main(["eval", "--checkpoint", str(out / "last.pth"), "model.img_size=48", "data.resize=48"]) == 2
    err = capsys.readouterr().err
    assert "backbone.pos_embed: checkpoint (1, 17, 32) vs model (1, 37, 32)" in err
    wider = "model.timm_kwargs={depth: 2, embed_dim: 48, num_heads: 2, patch_size: 8}"
    assert main([*train_args(data, out, "--resume", wider, batch=6, epochs=2)]) == 2
    err = capsys.readouterr().err  # --resume compares the configs before it loads the weights
    assert "model.timm_kwargs: " in err and '"embed_dim": 32' in err and '-> {"depth": 2, "embed_dim": 48' in err
    assert snapshot(out) == kept


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_cannot_run_code(tmp_path, capsys):
    evil, marker = tmp_path / "evil.pth", tmp_path / "code_ran"
    torch.save({"model": RunsCode(str(marker)), "config": "{}"}, evil)
    assert main(["eval", "--checkpoint", str(evil)]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("override, key", [
    ("model.top_r=0", "model.top_r"),
    ("model.top_r=1.5", "model.top_r"),
    ("model.pwca_blocks=3", "model.pwca_blocks"),  # T > depth (2)
    ("train.epochs=-1", "train.epochs"),
    ("train.save_every_steps=-5", "train.save_every_steps"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("data.on_bad_image=ignore", "data.on_bad_image"),
])
def test_out_of_range_config_is_refused_before_anything_is_written(trained, tmp_path, capsys, override, key):
    data, out = trained
    kept = snapshot(out)
    assert main(train_args(data, tmp_path / "new", override)) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(train_args(data, out, "--resume", override, epochs=2)) == 2
    assert key in capsys.readouterr().err
    assert snapshot(out) == kept


def test_reid_batch_not_divisible_by_k_is_refused(tmp_path, capsys):
    args = ["train", "--config", str(write_recipe(tmp_path)), f"output_dir={tmp_path / 'r'}",
            "train.batch_size=10", "train.num_instances=4"]
    assert main(args) == 2
    assert "train.num_instances" in capsys.readouterr().err and not (tmp_path / "r").exists()


def write_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "reid.yaml"
    path.write_text(f"data:\n  dataset: market1501\n  root: {tmp_path / 'nowhere'}\n")
    return path


def test_broken_check_waits_for_evidence_and_still_stops_an_all_bad_set(caplog, recwarn):
    from dcal.config import load_config
    from dcal.data.robust import BadImageError, LoadedBatch
    from dcal.engine.build import build_criterion, build_model, build_optimizer
    from dcal.engine.loop import train_one_epoch
    from dcal.engine.state import TrainState

    cfg = load_config(overrides=["data.dataset=synthetic", "model.img_size=32", TINY[1], "model.pwca_blocks=2",
                                 "train.batch_size=2", "train.epochs=1"])
    model = build_model(cfg, 3)
    criterion = build_criterion(cfg, model)
    optimizer = build_optimizer(cfg, model, criterion)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    bad = LoadedBatch(None, torch.empty(0, dtype=torch.long), [("x/bad0.png", "r"), ("x/bad1.png", "r")])
    good = LoadedBatch([torch.randn(2, 3, 32, 32), torch.tensor([0, 1])], torch.arange(2), [])
    # 20 % bad, the first batch all bad: no verdict from 2 images
    stats = train_one_epoch(TrainState(model, criterion, optimizer, scheduler), [bad] + [good] * 4,
                            torch.device("cpu"), cfg, 0, show_bar=False)
    assert stats["bad_images"] == 2 and "skipped unreadable image x/bad0.png (r)" in warned(caplog)[0]
    # the skipped first batch steps the schedule before any optimizer step (by design): PyTorch's warning is not shown
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    caplog.clear()
    with pytest.raises(BadImageError, match="looks broken"):
        train_one_epoch(TrainState(model, criterion, optimizer, scheduler), [bad] * 3, torch.device("cpu"), cfg, 0,
                        show_bar=False)
    assert warned(caplog)


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("dcal ")]


def test_a_bad_image_in_a_loader_worker_is_one_line(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    bad = data / "train" / "beta" / "notes.jpg"
    bad.write_bytes(BAD_FILES["beta/notes.jpg"])
    assert main(train_args(data, tmp_path / "run", "data.on_bad_image=error", "train.workers=2")) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"dcal train: error: cannot read image {bad} (UnidentifiedImageError")
    assert lines[0].endswith("set data.on_bad_image=skip to skip such files with a warning")


def test_a_killed_loader_worker_is_one_line(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from dcal.data.fgvc import FGVCDataset

    real = FGVCDataset.load_image

    def load_image(self, index):
        if torch.utils.data.get_worker_info() is not None:  # what the out-of-memory killer does
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, index)

    monkeypatch.setattr(FGVCDataset, "load_image", load_image)
    data = write_folder(tmp_path / "data")
    assert main(train_args(data, tmp_path / "run", "train.workers=2")) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "DataLoader worker (pid" in lines[0] and "fewer workers" in lines[0]


def test_a_missing_device_is_one_line(trained, capsys):
    data, out = trained
    image = str(next((data / "test").rglob("*.png")))
    want = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["predict", "--run", str(out), image, "--device", want]) == 2
    assert error_lines(capsys) == [f"dcal predict: error: --device={want} " + (
        f"but this machine has {torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available()
        else "but no CUDA device is available (use cpu)")]
    assert main(["predict", "--run", str(out), image, "--device", "gpu"]) == 2
    assert "--device=gpu: not a device" in error_lines(capsys)[0]
    if not torch.cuda.is_available():
        assert main(["eval", "--run", str(out), "train.device=cuda"]) == 2
        assert "train.device=cuda but no CUDA device" in error_lines(capsys)[0]


@pytest.mark.parametrize("code, said", [("ENOSPC", "No space left on device"), ("EROFS", "Read-only file system"),
                                        ("EACCES", "Permission denied")])
def test_a_full_disk_or_read_only_folder_is_one_line_naming_the_file(trained, tmp_path, capsys, monkeypatch, code,
                                                                     said):
    import errno
    import os

    data, out = trained
    number = getattr(errno, code)

    def fsync(fd):  # where a full disk shows up at the latest; no file name, like the real one
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(out), str(data / "test"), "--output", str(target)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"dcal predict: error: {target}: {said} (")
    assert not target.exists() and list(tmp_path.glob(".preds.csv.*")) == []  # no half file, no temporary
