"""Transforms of the FGVC and Re-ID recipes: output shapes, normalisation, flips, random erasing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dcal.config import load_config
from dcal.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    backbone_mean_std,
    build_transforms,
    build_transforms_from_config,
)


def _photo(w: int = 300, h: int = 200) -> Image.Image:
    g = torch.arange(w * h * 3, dtype=torch.int64).reshape(h, w, 3) % 251
    return Image.fromarray(g.to(torch.uint8).numpy())


@pytest.mark.parametrize("train", [True, False])
def test_fgvc_recipe_shapes(train: bool) -> None:
    t = build_transforms("fgvc", train, img_size=448, resize=550)
    x = t(_photo())
    assert x.shape == (3, 448, 448) and x.dtype == torch.float32
    names = [type(op).__name__ for op in t.transforms]
    crop = "RandomCrop" if train else "CenterCrop"
    assert names[:2] == ["Resize", crop] and names[-1] == "Normalize"
    assert list(t.transforms[0].size) == [550, 550]  # a square resize, not a shorter-side one
    assert ("RandomHorizontalFlip" in names) == train


def test_fgvc_sizes_as_pairs_and_no_resize() -> None:
    assert build_transforms("fgvc", True, img_size=(96, 64), resize=(110, 80))(_photo()).shape == (3, 96, 64)
    assert build_transforms("fgvc", False, img_size=64)(_photo()).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="smaller"):
        build_transforms("fgvc", True, img_size=448, resize=400)


@pytest.mark.parametrize("size", [(256, 128), (256, 256)])
def test_reid_recipe_shapes(size: tuple[int, int]) -> None:
    train = build_transforms("reid", True, img_size=size)
    test = build_transforms("reid", False, img_size=size)
    assert train(_photo(64, 128)).shape == (3, *size)
    assert test(_photo(64, 128)).shape == (3, *size)
    names = [type(op).__name__ for op in train.transforms]
    assert names == [
        "Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToImage", "ToDtype", "Normalize", "RandomErasing"
    ]
    assert train.transforms[2].padding in (10, [10], [10, 10, 10, 10])
    assert [type(op).__name__ for op in test.transforms] == ["Resize", "ToImage", "ToDtype", "Normalize"]


def test_normalisation_uses_backbone_mean_std() -> None:
    mean, std = backbone_mean_std("deit_small_patch16_224")
    assert mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert backbone_mean_std("vit_base_patch16_224.augreg_in21k") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbone_mean_std("vit_base_patch16_224.no_such_tag")[0] == pytest.approx((0.5, 0.5, 0.5))
    assert backbone_mean_std("not_a_model") == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    # an image of exactly the mean colour normalises to ~0
    mean_rgb = tuple(round(255 * m) for m in mean)
    x = build_transforms("fgvc", False, 32, mean=mean, std=std)(Image.new("RGB", (40, 40), mean_rgb))
    assert x.abs().max() < 0.01
    grey = Image.new("RGB", (40, 40), (255, 255, 255))
    y = build_transforms("reid", False, 32, mean=(0.5,) * 3, std=(0.5,) * 3)(grey)
    assert torch.allclose(y, torch.ones_like(y))


def test_flip_and_erasing_modes() -> None:
    img = _photo(32, 32)
    flipped = build_transforms("fgvc", True, 32, hflip=1.0)(img)
    plain = build_transforms("fgvc", False, 32)(img)
    assert torch.allclose(flipped, plain.flip(-1))
    torch.manual_seed(0)
    t = build_transforms("reid", True, 32, pad=0, hflip=0.0, random_erasing=1.0, erasing_mode="mean")
    erased = t(img)
    assert ((erased == 0).all(0)).sum() > 0.02 * 32 * 32  # a box filled with the mean colour (0)
    none = build_transforms("reid", True, 32, pad=0, hflip=0.0, random_erasing=0.0)
    assert "RandomErasing" not in [type(op).__name__ for op in none.transforms]
    with pytest.raises(ValueError, match="erasing_mode"):
        build_transforms("reid", True, 32, erasing_mode="zero")
    with pytest.raises(ValueError, match="task"):
        build_transforms("det", True, 32)


def test_from_config() -> None:
    cfg = load_config(None, ["data.dataset=cub", "model.img_size=64", "data.resize=72"])
    assert build_transforms_from_config(cfg, True)(_photo()).shape == (3, 64, 64)
    cfg = load_config(None, ["data.dataset=market1501", "model.img_size=[64,32]", "data.resize=null"])
    t = build_transforms_from_config(cfg, False)
    assert t(_photo(64, 128)).shape == (3, 64, 32)
    assert list(t.transforms[-1].mean) == pytest.approx(IMAGENET_DEFAULT_MEAN)  # deit: ImageNet mean
    cfg = load_config(None, ["data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "model.img_size=64"])
    assert list(build_transforms_from_config(cfg, False).transforms[-1].std) == [0.25] * 3
