"""Building a run from its config: datasets, model, loss, optimizer, schedule, loaders, the training step."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dcal.config import dataset_kwargs, pk_batches
from dcal.data import build_dataset
from dcal.data.layout import DatasetFormatError
from dcal.data.robust import SkipBadImages, collate_skipping_bad
from dcal.data.samplers import RandomIdentitySampler, ShardedShuffleSampler, ShardSampler
from dcal.data.subsets import merge_splits, select_classes, select_identities
from dcal.data.transforms import build_transforms_from_config
from dcal.losses import DCALLoss, LossOutput, param_groups
from dcal.model import DCAL, create_model
from dcal.model.dcal import autocast
from dcal.run_folder import backbone_weights
from dcal.vocabulary import AMP_PRECISION


def build_datasets(cfg: DictConfig, train: bool = True) -> dict[str, Dataset]:
    """``train`` + ``test`` (FGVC) or ``train`` + ``query`` + ``gallery`` (Re-ID); layout errors surface here,
    before any training starts."""
    test_tf = build_transforms_from_config(cfg, train=False)
    splits = ("test",) if cfg.task == "fgvc" else ("query", "gallery")
    sets = {s: _split(cfg, s, test_tf) for s in splits}
    if train:
        tf = build_transforms_from_config(cfg, train=True)
        sets = {"train": merge_splits([_split(cfg, s, tf) for s in cfg.data.train_splits]), **sets}
        if sets["train"].num_classes < 2:  # a classifier of one class learns nothing (and its loss is 0)
            kind = "class(es)" if cfg.task == "fgvc" else "identity(ies)"
            raise ValueError(f"training set in {cfg.data.root} has {sets['train'].num_classes} {kind}: at least 2 "
                             "are needed")
    if cfg.task == "reid":
        from dcal.data.reid import check_query_gallery

        check_query_gallery(sets["query"], sets["gallery"])
    return sets


def _split(cfg: DictConfig, split: str, transform: Any) -> Dataset:
    """One split, restricted to ``data.classes`` / ``data.identities``."""
    d = cfg.data
    dataset = build_dataset(d.dataset, d.root, split, transform=transform, **dataset_kwargs(cfg))
    plain = lambda v: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v  # noqa: E731
    try:
        if d.classes is not None:
            return select_classes(dataset, plain(d.classes))
        if d.identities is not None:
            return select_identities(dataset, plain(d.identities))
    except ValueError as e:
        raise DatasetFormatError(f"{e} (data.root={d.root})") from None
    return dataset


def build_model(cfg: DictConfig, num_classes: int) -> DCAL:
    m = cfg.model
    img_size = m.img_size if isinstance(m.img_size, int) else tuple(m.img_size)
    return create_model(
        m.backbone,
        task=cfg.task,
        num_classes=num_classes,
        img_size=img_size,
        top_r=m.top_r,
        glca_blocks=m.glca_blocks,
        pwca_blocks=m.pwca_blocks,
        pretrained=m.pretrained,
        pretrained_file=backbone_weights(m.pretrained_file) if m.pretrained_file else None,
        query_selection=m.query_selection,
        pair_strategy=m.pair_strategy,
        glca_pool=m.glca_pool,
        patch_stride=m.patch_stride,
        drop_path_rate=m.drop_path_rate,
        **OmegaConf.to_container(m.timm_kwargs),
    )


def build_criterion(cfg: DictConfig, model: DCAL) -> DCALLoss:
    lo = cfg.loss
    fixed = None
    if lo.weighting == "fixed":
        weights = dict(zip(("sa", "glca", "pwca"), lo.fixed_weights or (1.0, 1.0, 1.0), strict=True))
        fixed = {b: weights[b] for b in model.branches}
    return DCALLoss(
        cfg.task,
        model.branches,
        label_smoothing=lo.label_smoothing,
        triplet_margin=lo.triplet_margin,
        soft_margin=lo.triplet_soft_margin,
        fixed_weights=fixed,
    )


def build_optimizer(cfg: DictConfig, model: nn.Module, criterion: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, criterion, t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    return torch.optim.AdamW(groups, lr=t.lr)


def lr_factor(cfg: DictConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step``: linear warm-up, then cosine/step/constant."""
    t = cfg.train
    warmup = t.warmup_epochs * steps_per_epoch
    if step < warmup:
        start = t.warmup_lr / t.lr
        return start + (1.0 - start) * step / warmup
    if t.scheduler == "cosine":
        total = max(1, t.epochs * steps_per_epoch - warmup)
        floor = t.min_lr / t.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))
    if t.scheduler == "step":
        epoch = step // steps_per_epoch
        return t.step_gamma ** sum(epoch >= e for e in t.step_epochs)
    return 1.0


def train_loader(
    cfg: DictConfig, dataset: Dataset, epoch: int, batch_size: int | None = None, start_batch: int = 0
) -> DataLoader:
    """Loader for one epoch of this process's share, from batch ``start_batch`` on (mid-epoch resume).

    The order depends only on (seed, epoch), so a resumed run sees the same batches; under torchrun each
    process draws a disjoint share (FGVC: :class:`ShardedShuffleSampler`; Re-ID and ``train.sampler=pk``: the P x K
    sampler's shares).
    Items go through :class:`SkipBadImages` (``data.on_bad_image``), so a batch is a ``LoadedBatch``.
    """
    t = cfg.train
    bs = batch_size or t.batch_size
    if pk_batches(cfg):
        sampler: Any = RandomIdentitySampler(dataset.targets, batch_size=bs, num_instances=t.num_instances, seed=t.seed)
    else:
        sampler = ShardedShuffleSampler(len(dataset), bs, seed=t.seed)
        if sampler.num_batches == 0:
            raise ValueError(f"training set has {len(dataset)} images, fewer than one global batch of "
                             f"{bs} x {sampler.num_replicas} process(es) (train.batch_size)")
    sampler.set_epoch(epoch, start_batch)
    # drop_last: PWCA pairs images within a batch, so a trailing batch of one image could not be trained.
    # The generator fixes the workers' base seed (and keeps the global RNG untouched by the loader).
    return DataLoader(SkipBadImages(dataset, cfg.data.on_bad_image), batch_size=bs, sampler=sampler, drop_last=True,
                      num_workers=t.workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_skipping_bad,
                      generator=torch.Generator().manual_seed(t.seed * 1000 + epoch))


def eval_loader(cfg: DictConfig, dataset: Dataset) -> DataLoader:
    """This process's contiguous share of an evaluation set (all of it in one process), bad images skipped."""
    bs = cfg.eval.batch_size or cfg.train.batch_size
    return DataLoader(SkipBadImages(dataset, cfg.data.on_bad_image), batch_size=bs, sampler=ShardSampler(len(dataset)),
                      num_workers=cfg.train.workers, collate_fn=collate_skipping_bad)


def config_autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """:func:`dcal.model.dcal.autocast` on ``device`` at the precision ``train.amp`` names (none | bf16 | fp16)."""
    return autocast(device, AMP_PRECISION[cfg.train.amp])


def _float32(v: Any) -> Any:
    """Losses in float32 whatever the autocast dtype of the logits."""
    if isinstance(v, dict):
        return {k: _float32(x) for k, x in v.items()}
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


class ForwardLoss(nn.Module):
    """Model forward (under ``train.amp``) + loss as one module.

    DDP wraps this module, not the bare model, so that the learnable loss weights in ``criterion`` are
    averaged across processes like every model parameter. ``net`` is the model or its compiled form.
    """

    def __init__(self, net: nn.Module, criterion: DCALLoss, cfg: DictConfig, device: torch.device) -> None:
        super().__init__()
        self.net, self.criterion = net, criterion
        self.cfg, self.device = cfg, device

    def forward(self, images: torch.Tensor, targets: torch.Tensor, pairs: torch.Tensor | None = None) -> LossOutput:
        with config_autocast(self.cfg, self.device):
            out = self.net(images, targets=targets, pairs=pairs)
        return self.criterion(_float32(out), targets)
