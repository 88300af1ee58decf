"""Training and evaluation engine (DeiT's ``main.py`` + ``engine.py`` shape).

``fit(cfg)`` is the whole training run: build data, model, loss, optimizer and schedule from a loaded config
(``dcal.config``), then per epoch ``train_one_epoch`` → ``evaluate`` → log (``metrics.jsonl``, TensorBoard if
installed) → checkpoint (``last.pth``, ``best.pth``, ``best.safetensors``). Side effects stay in ``fit``;
the per-epoch functions only compute.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dcal.checkpoint import export_weights, load_training_state, save_training_state, set_rng_state
from dcal.config import dataset_kwargs, to_yaml
from dcal.data import build_dataset
from dcal.data.transforms import build_transforms_from_config
from dcal.losses import DCALLoss, param_groups
from dcal.model import DCAL, create_model
from dcal.model.dcal import autocast as model_autocast
from dcal.model.dcal import compile_model, fusion_branches

BEST_METRIC = {"fgvc": "top1", "reid": "mAP"}


# --------------------------------------------------------------------------------------------- building
def build_datasets(cfg: DictConfig, train: bool = True) -> dict[str, Dataset]:
    """``train`` + ``test`` (FGVC) or ``train`` + ``query`` + ``gallery`` (Re-ID); layout errors surface here,
    before any training starts."""
    kw = dataset_kwargs(cfg)
    test_tf = build_transforms_from_config(cfg, train=False)
    splits = ("test",) if cfg.task == "fgvc" else ("query", "gallery")
    sets = {s: build_dataset(cfg.data.dataset, cfg.data.root, s, transform=test_tf, **kw) for s in splits}
    if train:
        tf = build_transforms_from_config(cfg, train=True)
        sets = {"train": build_dataset(cfg.data.dataset, cfg.data.root, "train", transform=tf, **kw), **sets}
    if cfg.task == "reid":
        from dcal.data.reid import check_query_gallery

        check_query_gallery(sets["query"], sets["gallery"])
    return sets


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
        pretrained_file=m.pretrained_file,
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


def train_loader(cfg: DictConfig, dataset: Dataset, epoch: int, batch_size: int | None = None) -> DataLoader:
    """Loader for one epoch; its order depends only on (seed, epoch), so a resumed run sees the same batches."""
    t = cfg.train
    bs = batch_size or t.batch_size
    g = torch.Generator().manual_seed(t.seed * 1000 + epoch)
    common = dict(num_workers=t.workers, pin_memory=torch.cuda.is_available(), generator=g)
    if cfg.task == "reid":
        from dcal.data.samplers import RandomIdentitySampler

        sampler = RandomIdentitySampler(dataset.pids, batch_size=bs, num_instances=t.num_instances, seed=t.seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=True, **common)
    if len(dataset) < bs:
        raise ValueError(f"training set has {len(dataset)} images, fewer than train.batch_size={bs}")
    # drop_last: PWCA pairs images within a batch, so a trailing batch of one image could not be trained
    return DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=True, **common)


def eval_loader(cfg: DictConfig, dataset: Dataset) -> DataLoader:
    bs = cfg.eval.batch_size or cfg.train.batch_size
    return DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=cfg.train.workers)


def autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The model's mixed-precision context for ``train.amp`` (none | bf16 | fp16)."""
    return model_autocast(device, {"none": "fp32"}.get(cfg.train.amp, cfg.train.amp))


def resolve_device(cfg: DictConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(want)


# ------------------------------------------------------------------------------------------ one epoch
def train_one_epoch(
    model: nn.Module,
    criterion: DCALLoss,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: DictConfig,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    forward: nn.Module | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean losses, loss weights, last lr and throughput."""
    model.train()
    criterion.train()
    forward = forward or model
    sums: dict[str, float] = {}
    seen, n_batches, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    for batch in bar:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(cfg, device):
            out = forward(images, targets=targets)
        res = criterion({k: _float32(v) for k, v in out.items()}, targets)
        if not torch.isfinite(res.total):
            raise FloatingPointError(f"loss is {res.total.item()} at epoch {epoch + 1}, batch {n_batches}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(res.total).backward()
            scaler.unscale_(optimizer)
        else:
            res.total.backward()
        if cfg.train.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        seen += images.shape[0]
        n_batches += 1
        values = {"loss": res.total.item(), **{f"loss_{b}": v.item() for b, v in res.per_branch.items()}}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{rate:.1f}")
    if n_batches == 0:
        raise ValueError("the training loader yielded no batch (dataset smaller than one batch?)")
    stats = {k: v / n_batches for k, v in sums.items()}
    stats.update({f"weight_{b}": w for b, w in res.weights.items()})
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["images_per_s"] = seen / (time.perf_counter() - start)
    return stats


def _float32(v: Any) -> Any:
    """Losses in float32 whatever the autocast dtype of the logits."""
    if isinstance(v, dict):
        return {k: _float32(x) for k, x in v.items()}
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


@torch.no_grad()
def evaluate_fgvc(model: DCAL, loader: Iterable, device: torch.device, cfg: DictConfig) -> dict[str, float]:
    """Top-1 of SA, GLCA and their fusion (softmax(SA) + softmax(GLCA), the paper's prediction)."""
    model.eval()
    correct: dict[str, int] = {}
    total = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with autocast(cfg, device):
            logits = model(images)["logits"]
        probs = {b: v.float().softmax(-1) for b, v in logits.items()}
        preds = {f"top1_{b}": p.argmax(-1) for b, p in probs.items()}
        preds["top1"] = sum(probs[b] for b in fusion_branches(cfg.eval.fusion, model.cfg.glca_blocks)).argmax(-1)
        for k, p in preds.items():
            correct[k] = correct.get(k, 0) + int((p == targets).sum())
        total += targets.numel()
    return {k: 100.0 * v / total for k, v in correct.items()}


@torch.no_grad()
def extract_features(model: DCAL, loader: Iterable, device: torch.device, cfg: DictConfig) -> torch.Tensor:
    """Re-ID embeddings (concat of SA and GLCA by default), optionally averaged with the mirrored image."""
    model.eval()
    fusion = cfg.eval.fusion
    after_bn = cfg.eval.reid_feature == "after_bn"
    feats = []
    for batch in loader:
        images = batch[0].to(device)
        with autocast(cfg, device):
            f = model.embed(images, fusion=fusion, after_bn=after_bn).float()
            if cfg.eval.flip:
                f = 0.5 * (f + model.embed(images.flip(3), fusion=fusion, after_bn=after_bn).float())
        feats.append(f.cpu())
    return torch.cat(feats)


def evaluate_reid_model(
    model: DCAL, query: Dataset, gallery: Dataset, device: torch.device, cfg: DictConfig
) -> dict[str, Any]:
    """mAP, CMC rank-1/5/10 and mINP under the standard protocol (``dcal.metrics.evaluate_reid``)."""
    from dcal.metrics import eval_reid_features

    qf = extract_features(model, eval_loader(cfg, query), device, cfg)
    gf = extract_features(model, eval_loader(cfg, gallery), device, cfg)
    res = eval_reid_features(qf, gf, query.pids, gallery.pids, query.camids, gallery.camids,
                             metric=cfg.eval.metric, rerank=cfg.eval.rerank, max_rank=cfg.eval.max_rank)
    out = {k: 100.0 * float(res[k]) for k in ("mAP", "rank1", "rank5", "rank10", "mINP")}
    out["num_skipped_queries"] = int(res.get("num_skipped_queries", 0))
    return out


def evaluate(model: DCAL, sets: dict[str, Dataset], device: torch.device, cfg: DictConfig) -> dict[str, Any]:
    if cfg.task == "fgvc":
        return evaluate_fgvc(model, eval_loader(cfg, sets["test"]), device, cfg)
    return evaluate_reid_model(model, sets["query"], sets["gallery"], device, cfg)


# ------------------------------------------------------------------------------------------------ run
class RunExistsError(FileExistsError):
    """output_dir already holds a run and --resume was not given."""


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log(msg: str) -> None:
    print(msg, flush=True)


def fit(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    """Train (and evaluate every ``train.eval_every`` epochs) as ``cfg`` says; returns the final record."""
    out_dir = Path(cfg.output_dir)
    resume = resume or cfg.train.resume
    last_path = out_dir / "last.pth"
    if last_path.exists() and not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run ({last_path.name}); pass --resume to continue it or choose "
            f"another output_dir (output_dir=...)"
        )
    if resume and not last_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {last_path} to continue from")

    seed_everything(cfg.train.seed)
    device = resolve_device(cfg)
    sets = build_datasets(cfg)  # dataset layout errors surface before anything is written
    num_classes = cfg.data.num_classes or sets["train"].num_classes
    model = build_model(cfg, num_classes).to(device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    criterion = build_criterion(cfg, model).to(device)
    optimizer = build_optimizer(cfg, model, criterion)
    steps_per_epoch = len(train_loader(cfg, sets["train"], 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
    scaler = None
    if cfg.train.amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device (use train.amp=bf16 on the CPU)")
        scaler = torch.amp.GradScaler("cuda")
    forward = compile_model(model) if cfg.train.compile else model

    start_epoch, best, best_epoch = 0, -math.inf, -1
    metric_name = BEST_METRIC[cfg.task]
    records: list[dict[str, Any]] = []
    metrics_path = out_dir / "metrics.jsonl"
    if resume:
        state = load_training_state(last_path)
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        records = [r for r in _read_jsonl(metrics_path) if not r.get("final") and r["epoch"] < start_epoch]
        if state.get("record") and all(r["epoch"] != state["record"]["epoch"] for r in records):
            records.append(state["record"])
        set_rng_state(state["rng"])
        _log(f"resuming {out_dir} at epoch {start_epoch + 1}/{cfg.train.epochs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    _write_jsonl(metrics_path, records)
    writer = _tensorboard(out_dir)
    _log(f"{cfg.task}: {len(sets['train'])} training images, {num_classes} classes; model {cfg.model.backbone} "
         f"branches {model.branches}; {steps_per_epoch} steps/epoch on {device}; writing to {out_dir}")

    t0 = time.perf_counter()
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        loader = train_loader(cfg, sets["train"], epoch)
        stats = train_one_epoch(model, criterion, loader, optimizer, scheduler, device, cfg, epoch, scaler,
                                forward)
        record = {"epoch": epoch, **stats}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            record.update(evaluate(model, sets, device, cfg))
        improved = metric_name in record and record[metric_name] > best
        if improved:
            best, best_epoch = record[metric_name], epoch
        # one training state per epoch, written to every file that wants it
        state = _state(cfg, model, criterion, optimizer, scheduler, scaler, epoch, best, best_epoch, record)
        if improved:
            save_training_state(out_dir / "best.pth", **state)
            export_weights(out_dir / "best.safetensors", model, to_yaml(cfg),
                           {"classes": _classes(sets["train"]), "epoch": epoch, metric_name: best})
        save_training_state(last_path, **state)
        if cfg.train.save_every and (epoch + 1) % cfg.train.save_every == 0:
            save_training_state(out_dir / f"epoch{epoch + 1:04d}.pth", **state)
        _append_jsonl(metrics_path, record)
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(k, v, epoch + 1)
        _log(_summary(record, cfg))
    export_weights(out_dir / "last.safetensors", model, to_yaml(cfg), {"classes": _classes(sets["train"])})
    final = {"final": True, "epoch": cfg.train.epochs - 1, f"best_{metric_name}": best, "best_epoch": best_epoch,
             "train_time_s": time.perf_counter() - t0,
             **{k: v for k, v in record.items() if k not in ("epoch",)}}
    _append_jsonl(metrics_path, final)
    if writer is not None:
        writer.close()
    _log(f"done: best {metric_name} {best:.2f} at epoch {best_epoch + 1}; checkpoints in {out_dir}")
    return final


def _state(cfg, model, criterion, optimizer, scheduler, scaler, epoch, best, best_epoch, record) -> dict[str, Any]:
    from dcal.model import model_config

    return {
        "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch, "best": best, "best_epoch": best_epoch, "record": record,
        "config": to_yaml(cfg), "model_config": model_config(model),
    }


def _classes(dataset: Dataset) -> list[str] | int:
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else int(getattr(dataset, "num_classes", 0))


def _summary(record: dict[str, Any], cfg: DictConfig) -> str:
    keys = ("top1", "top1_sa", "top1_glca") if cfg.task == "fgvc" else ("mAP", "rank1", "mINP")
    scores = " ".join(f"{k} {record[k]:.2f}" for k in keys if k in record)
    return (f"epoch {record['epoch'] + 1}/{cfg.train.epochs} loss {record['loss']:.4f} lr {record['lr']:.3e} "
            f"{record['images_per_s']:.1f} img/s {scores}")


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (pip install dcal[tensorboard])
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------- eval only
def load_for_eval(run: str | None = None, checkpoint: str | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, DCAL]:
    """Config and model of a finished run (``run`` dir: its best, else last, checkpoint) or of a checkpoint file
    (``.pth`` training state or ``.safetensors`` export); ``overrides`` may change data/eval keys."""
    import yaml

    from dcal.checkpoint import read_export
    from dcal.config import load_config, upgrade_saved_config

    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run DIR or --checkpoint FILE")
    if run is not None:
        run_dir = Path(run)
        candidates = [run_dir / n for n in ("best.safetensors", "best.pth", "last.safetensors", "last.pth")]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"run directory {run_dir} holds no checkpoint (looked for "
                                    f"{', '.join(p.name for p in candidates)})")
        checkpoint = str(found[0])
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        state, config_yaml, _ = read_export(path)
    else:
        ckpt = load_training_state(path)
        state, config_yaml = ckpt["model"], ckpt["config"]
    cfg = load_config(None, overrides, values=upgrade_saved_config(yaml.safe_load(config_yaml), str(path)))
    # weights come from the checkpoint: do not download or read pre-trained backbones again
    cfg.model.pretrained, cfg.model.pretrained_file = False, None
    head = "backbone.head.weight" if cfg.task == "fgvc" else "sa_neck.classifier.weight"
    model = build_model(cfg, int(state[head].shape[0]))
    model.load_state_dict(state)
    return cfg, model


def evaluate_checkpoint(cfg: DictConfig, model: DCAL) -> dict[str, Any]:
    device = resolve_device(cfg)
    model.to(device)
    sets = build_datasets(cfg, train=False)
    return evaluate(model, sets, device, cfg)
