"""Tiny trained runs shared by the tests of the inference commands (predict, embed, search, export, report,
visualize): one FGVC run on a 3-class folder set and one Re-ID run on a Market-1501-style set, each trained for two
epochs of a 2-block, 48-dim ViT on 32-pixel images (a few seconds), built once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcal.cli import main
from tests.helpers import TINY_TIMM_KWARGS

TINY_MODEL = [
    "model.backbone=deit_tiny_patch16_224",
    TINY_TIMM_KWARGS,
    "model.pwca_blocks=2",
    "train.workers=0",
    "train.epochs=2",
]
CLASSES = ("alpha", "beta", "gamma")


def write_images(folder: Path, names: list[str], rng: np.random.Generator, size=(40, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


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
    rng = np.random.default_rng(1)
    root = base / "market"
    train = [f"{pid:04d}_c{1 + i % 2}s1_{i:06d}_00.jpg" for pid in (2, 7, 9, 11) for i in range(4)]
    query = [f"{pid:04d}_c1s1_{100 + pid:06d}_00.jpg" for pid in (20, 21, 22, 23)]
    gallery = [f"{pid:04d}_c{c}s1_{200 + pid * 3 + c:06d}_00.jpg" for pid in (20, 21, 22, 23) for c in (2, 3)]
    gallery += ["0020_c1s1_000999_00.jpg", "-1_c1s1_000000_00.jpg", "0000_c2s1_000001_00.jpg"]
    for folder, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        write_images(root / folder, names, rng, size=(64, 32))
    recipe = base / "reid.yaml"
    recipe.write_text("data:\n  dataset: market1501\n  resize: null\ntrain:\n  batch_size: 8\n  num_instances: 4\n"
                      "  optimizer: sgd\n  lr: 0.008\n  weight_decay: 1.0e-4\n")
    run = base / "run"
    assert main(["train", "--config", str(recipe), f"data.root={root}", f"output_dir={run}", "model.img_size=[32,16]",
                 *TINY_MODEL]) == 0
    return run, root
