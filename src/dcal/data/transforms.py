"""Image transforms of the paper's two recipes (torchvision.transforms.v2), and the backbone's normalisation.

FGVC (paper §4.1): resize to 550x550, random crop 448 + horizontal flip for training; resize 550x550 and
centre crop 448 for testing. Interpolation is bilinear, as in the FGVC ViT codebases (TransFG) the recipe
comes from.

Re-ID (TransReID's pipeline, which the paper's Re-ID recipe follows): resize to 256x128 (persons) or
256x256 (vehicles), horizontal flip, pad 10 + random crop back to size, normalise, random erasing p=0.5;
testing: resize + normalise. Interpolation is bicubic, as in TransReID.

Random erasing: TransReID uses timm's ``RandomErasing(mode='pixel')``, which fills the erased box with
per-pixel N(0, 1) noise in normalised space; torchvision's ``value='random'`` is the same thing, so that is
the default here (``erasing_mode='pixel'``). ``erasing_mode='mean'`` fills with 0 in normalised space, i.e.
with the backbone's mean colour (the older reid-strong-baseline choice). torchvision's own default
(``value=0``) is that mean fill. Erased area 2-33% of the image, aspect 0.3-3.3 (the same ranges as timm's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from dcal.vocabulary import ERASING_MODES, TASKS

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _hw(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair."""
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)  # type: ignore[union-attr]
        if len(hw) != 2:
            raise ValueError(f"{what} must be an int or (H, W), got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return hw  # type: ignore[return-value]


def backbone_mean_std(backbone_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std of a timm model name (with or without a pretrained tag).

    Read from timm's pretrained config registry, which needs no download; an unknown name falls back to the
    ImageNet defaults. E.g. DeiT models use the ImageNet mean/std, ``vit_base_patch16_224.augreg_in21k``
    uses 0.5/0.5.
    """
    import timm

    names = [backbone_name]
    if "." in backbone_name:
        names.append(backbone_name.split(".", 1)[0])  # unknown tag: the architecture's default tag
    for name in names:
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except (RuntimeError, ValueError, KeyError):
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def build_transforms(
    task: str,
    train: bool,
    img_size: int | Sequence[int],
    resize: int | Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    hflip: float = 0.5,
    pad: int = 10,
    random_erasing: float = 0.5,
    erasing_mode: str = "pixel",
) -> v2.Compose:
    """The train or test transform of the ``fgvc`` or ``reid`` recipe; maps a PIL image to a float tensor.

    Args:
        task: ``fgvc`` or ``reid``.
        train: training (augmenting) or test transform.
        img_size: network input size, int (square) or (H, W): the crop size for FGVC, the resize size for
            Re-ID.
        resize: FGVC: size of the (non aspect-preserving) resize before the crop, 550 in the paper;
            None = resize straight to ``img_size`` (the crop then takes the whole image). Re-ID: size of the
            training resize before pad + crop (None = ``img_size``); the test transform always resizes to
            ``img_size``.
        mean, std: normalisation (see :func:`backbone_mean_std`).
        hflip: horizontal flip probability (training).
        pad: Re-ID training padding before the random crop (pixels, zero fill as in TransReID).
        random_erasing: Re-ID training random-erasing probability.
        erasing_mode: ``pixel`` (N(0, 1) noise, TransReID) or ``mean`` (the mean colour); see module doc.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if erasing_mode not in ERASING_MODES:
        raise ValueError(f"unknown erasing_mode {erasing_mode!r}; expected one of {ERASING_MODES}")
    size = _hw(img_size, "img_size")
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    ops: list[Any]
    if task == "fgvc":
        pre = _hw(resize, "resize") if resize is not None else size
        if pre[0] < size[0] or pre[1] < size[1]:
            raise ValueError(f"resize {pre} is smaller than the crop img_size {size}")
        resize_op = v2.Resize(pre, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if train:
            ops = [resize_op, v2.RandomCrop(size), v2.RandomHorizontalFlip(hflip), *to_tensor]
        else:
            ops = [resize_op, v2.CenterCrop(size), *to_tensor]
        return v2.Compose(ops)

    if train:
        pre = _hw(resize, "resize") if resize is not None else size
        ops = [
            v2.Resize(pre, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(hflip),
            v2.Pad(pad),
            v2.RandomCrop(size),
            *to_tensor,
        ]
        if random_erasing > 0:
            value: Any = "random" if erasing_mode == "pixel" else 0
            ops.append(v2.RandomErasing(p=random_erasing, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=value))
    else:
        ops = [v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True), *to_tensor]
    return v2.Compose(ops)


def config_mean_std(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of a loaded config: ``data.mean``/``data.std``, each None = the backbone's."""
    mean, std = backbone_mean_std(cfg.model.backbone)
    if cfg.data.mean is not None:
        mean = tuple(cfg.data.mean)
    if cfg.data.std is not None:
        std = tuple(cfg.data.std)
    return mean, std


def build_transforms_from_config(cfg: Any, train: bool) -> v2.Compose:
    """:func:`build_transforms` from a loaded :mod:`dcal.config` config (``task``, ``data.*``,
    ``model.img_size``, ``model.backbone``); normalisation from :func:`config_mean_std`."""
    mean, std = config_mean_std(cfg)
    img_size = cfg.model.img_size
    resize = cfg.data.resize
    return build_transforms(
        cfg.task,
        train,
        img_size if isinstance(img_size, int) else tuple(img_size),
        resize=None if resize is None else (resize if isinstance(resize, int) else tuple(resize)),
        mean=mean,
        std=std,
        hflip=cfg.data.hflip,
        pad=cfg.data.pad,
        random_erasing=cfg.data.random_erasing,
        erasing_mode=cfg.data.random_erasing_mode,
    )
