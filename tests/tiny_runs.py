"""Tiny trained runs shared by the tests of the inference commands (predict, embed, search, export, report,
visualize): one FGVC run on a 3-class folder set and one Re-ID run on a Market-1501-style set, each trained for two
epochs of a 2-block, 48-dim ViT on 32-pixel images (a few seconds), built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dcal.cli import main
from tests.helpers import TINY_TIMM_KWARGS, write_images, write_market_layout

TINY_MODEL = [
    "model.backbone=deit_tiny_patch16_224",
    TINY_TIMM_KWARGS,
    "model.pwca_blocks=2",
    "train.workers=0",
    "train.epochs=2",
]
CLASSES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def fgvc_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, data root with train/ and test/ class folders)."""
    base = tmp_path_factory.mktemp("fgvc")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in CLASSES:
            write_images(base / "data" / split / c, [f"{c}{i}.png" for i in range(n)], rng)
    recipe = base / "recipe.yaml"
    recipe.write_text("data:\n  dataset: folder\n  resize: 40\ntrain:\n  batch_size: 6\n")
    run = base / "run"
    assert main(["train", "--config", str(recipe), f"data.root={base / 'data'}", f"output_dir={run}",
                 "model.img_size=32", *TINY_MODEL]) == 0
    return run, base / "data"


@pytest.fixture(scope="session")
def reid_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, Market-1501 root): 4 training ids; 4 query ids, each in the gallery under 2 other cameras,
    plus a same-camera gallery image of query id 20 (excluded from its ranking) and a junk (-1) image."""
    base = tmp_path_factory.mktemp("reid")
    # a same-camera gallery image of query id 20 besides the shared layout
    root = write_market_layout(base / "market", extra_gallery=("0020_c1s1_000999_00.jpg",))
    recipe = base / "reid.yaml"
    recipe.write_text("data:\n  dataset: market1501\n  resize: null\ntrain:\n  batch_size: 8\n  num_instances: 4\n"
                      "  optimizer: sgd\n  lr: 0.008\n  weight_decay: 1.0e-4\n")
    run = base / "run"
    assert main(["train", "--config", str(recipe), f"data.root={root}", f"output_dir={run}", "model.img_size=[32,16]",
                 *TINY_MODEL]) == 0
    return run, root
