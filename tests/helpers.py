"""What the tests share: the tiny model, the tiny synthetic run, small image layouts written on the fly, the
benchmark scripts as modules and the location of the real sample data in ../shared/data.

Import from here (``from tests.helpers import tiny_model``); ``tests/conftest.py`` holds only pytest's hooks and
fixtures."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

import dcal

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (../shared/data is present in CI)"
)

# the tiny backbone: DeiT-T's code paths at 3 blocks of width 48, fast on the CPU
TINY_ARCH = {"depth": 3, "embed_dim": 48, "num_heads": 3}
# the tiny backbone of config-driven runs (dcal train ...): 2 blocks, 8-pixel patches (16 patches at 32 pixels)
TINY_TIMM_KWARGS = "model.timm_kwargs={depth: 2, embed_dim: 48, num_heads: 3, patch_size: 8}"


def tiny_model(task: str = "fgvc", img_size: Any = 32, num_classes: int = 5,
               backbone: str = "deit_tiny_patch16_224", **kw: Any) -> dcal.DCAL:
    """A DCAL model on the :data:`TINY_ARCH` backbone with PWCA on every block; ``kw`` go to
    ``dcal.create_model`` and override the architecture (``depth=2``, ``patch_size=8``, ...)."""
    kw.setdefault("pwca_blocks", kw.get("depth", TINY_ARCH["depth"]))
    return dcal.create_model(backbone, task=task, num_classes=num_classes, img_size=img_size, **{**TINY_ARCH, **kw})


# a config-driven run on the generated set: 2 classes x 12 = 24 training images, batch 4: 6 steps per epoch, a
# mid-epoch checkpoint every 2 steps
SYNTHETIC_RUN = [
    "data.dataset=synthetic", "data.resize=32", "data.synthetic_image_size=32", "data.synthetic_num_classes=2",
    "data.synthetic_train_per_class=12", "data.synthetic_test_per_class=2", "model.img_size=32",
    "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}", "model.pwca_blocks=2",
    "train.batch_size=4", "train.epochs=2", "train.workers=0", "train.device=cpu", "train.deterministic=true",
    "train.save_every_steps=2", "train.log_every=1",
]


def write_images(folder: Path, names: list[str], rng: np.random.Generator, size=(40, 40)) -> list[Path]:
    """Random RGB images of ``size`` (H, W) named ``names`` in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def write_market_layout(root: Path, extra_gallery: tuple[str, ...] = ()) -> Path:
    """Market-1501 layout under ``root``: 4 training ids x 4 images; 4 query ids, each in the gallery under 2 other
    cameras; then ``extra_gallery``, a junk (-1) and a distractor (0000) gallery image."""
    rng = np.random.default_rng(1)
    train = [f"{pid:04d}_c{1 + i % 2}s1_{i:06d}_00.jpg" for pid in (2, 7, 9, 11) for i in range(4)]
    query = [f"{pid:04d}_c1s1_{100 + pid:06d}_00.jpg" for pid in (20, 21, 22, 23)]
    gallery = [f"{pid:04d}_c{c}s1_{200 + pid * 3 + c:06d}_00.jpg" for pid in (20, 21, 22, 23) for c in (2, 3)]
    gallery += [*extra_gallery, "-1_c1s1_000000_00.jpg", "0000_c2s1_000001_00.jpg"]
    for folder, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        write_images(root / folder, names, rng, size=(64, 32))
    return root


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages (INFO and up) that dcal's logger ``name`` and its children log while the block runs: what
    the commands print of them (their console handler), for a fixture that ``caplog`` cannot serve."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, logger = _Collect(logging.INFO), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
