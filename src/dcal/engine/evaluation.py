"""Evaluation: FGVC top-1 and Re-ID mAP/CMC, sharded over the torchrun processes (finished runs load with
:func:`dcal.loading.load_model`).

Under torchrun every process evaluates a contiguous share of the test set (``eval_loader``); FGVC counts are
summed, Re-ID features are gathered in dataset order and scored once on rank 0, so a large gallery is not one
process's job. Unreadable test images are skipped (``data.on_bad_image=skip``) and counted in ``eval_bad_images``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from dcal.distributed import all_gather_cat, all_reduce_sum, broadcast_object, pick_device
from dcal.engine.build import build_datasets, config_autocast, eval_loader
from dcal.engine.loop import unpack_batch
from dcal.mechanism import evaluate_mechanism
from dcal.model import DCAL
from dcal.model.dcal import fusion_branches

logger = logging.getLogger(__name__)


def _batches(loader: Iterable) -> Iterable[tuple[Any, torch.Tensor | None, int]]:
    """(data, dataset indices or None, number of bad images) per batch, warning about each bad file."""
    for batch in loader:
        data, bad = unpack_batch(batch)
        for path, reason in bad:
            logger.warning("skipped unreadable test image %s (%s)", path, reason)
        yield data, getattr(batch, "indices", None), len(bad)


@torch.no_grad()
def evaluate_fgvc(model: DCAL, loader: Iterable, device: torch.device, cfg: DictConfig) -> dict[str, float]:
    """Top-1 of SA, GLCA and their fusion (softmax(SA) + softmax(GLCA), the paper's prediction), over all
    processes' shares."""
    model.eval()
    branches = fusion_branches(cfg.eval.fusion, model.cfg.glca_blocks)
    names = ["top1", *(f"top1_{b}" for b in model.branches if b != "pwca")]
    correct = dict.fromkeys(names, 0)
    total = bad = 0
    for data, _, n_bad in _batches(loader):
        bad += n_bad
        if data is None:
            continue
        images, targets = data[0].to(device), data[1].to(device)
        with config_autocast(cfg, device):
            logits = model(images)["logits"]
        probs = {b: v.float().softmax(-1) for b, v in logits.items()}
        preds = {f"top1_{b}": p.argmax(-1) for b, p in probs.items()}
        preds["top1"] = sum(probs[b] for b in branches).argmax(-1)
        for k in names:
            correct[k] += int((preds[k] == targets).sum())
        total += targets.numel()
    sums = all_reduce_sum([correct[k] for k in names] + [total, bad], device)
    total, bad = sums[-2], int(sums[-1])
    out = {k: 100.0 * c / max(total, 1) for k, c in zip(names, sums, strict=False)}
    return {**out, "eval_bad_images": bad} if bad else out


@torch.no_grad()
def extract_features(model: DCAL, loader: Iterable, device: torch.device, cfg: DictConfig,
                     return_indices: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Re-ID embeddings (concat of SA and GLCA by default), optionally averaged with the mirrored image; with
    ``return_indices`` also the dataset index of each row (bad images leave gaps)."""
    model.eval()
    fusion = cfg.eval.fusion
    after_bn = cfg.eval.reid_feature == "after_bn"
    feats, idx = [], []
    for data, indices, _ in _batches(loader):
        if data is None:
            continue
        images = data[0].to(device)
        with config_autocast(cfg, device):
            f = model.embed(images, fusion, after_bn, flip=bool(cfg.eval.flip)).float()
        feats.append(f)
        idx.append(indices if indices is not None else torch.arange(len(f)))
    dim = feats[0].shape[1] if feats else 0
    f_all = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    i_all = torch.cat(idx).to(device) if idx else torch.zeros(0, dtype=torch.long, device=device)
    return (f_all.cpu(), i_all.cpu()) if return_indices else f_all.cpu()


def _gathered_features(model: DCAL, dataset: Dataset, device: torch.device, cfg: DictConfig):
    """Features of the whole ``dataset`` (every process's share, in dataset order) and its kept pids/cams."""
    feats, idx = extract_features(model, eval_loader(cfg, dataset), device, cfg, return_indices=True)
    feats, idx = all_gather_cat(feats.to(device)).cpu(), all_gather_cat(idx.to(device)).cpu()
    pids, camids = torch.as_tensor(dataset.pids)[idx], torch.as_tensor(dataset.camids)[idx]
    return feats, pids, camids, len(dataset) - len(idx)


def evaluate_reid_model(
    model: DCAL, query: Dataset, gallery: Dataset, device: torch.device, cfg: DictConfig, roc: bool = False
) -> dict[str, Any]:
    """mAP, CMC rank-1/5/10 and mINP under the standard protocol (``dcal.metrics.eval_reid_features``: the
    gallery streamed in blocks of ``eval.chunk_size`` distances); features are extracted by every process and
    scored on rank 0 (the result is the same on every process). ``roc``: also the TPR at FPR 1e-2/1e-3/1e-4 with
    their distance thresholds, and the curve under ``roc_curve`` (``fpr``, ``tpr`` lists)."""
    from dcal.metrics import eval_reid_features, reid_scores

    qf, q_pids, q_cams, q_bad = _gathered_features(model, query, device, cfg)
    gf, g_pids, g_cams, g_bad = _gathered_features(model, gallery, device, cfg)
    out: dict[str, Any] | None = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        res = eval_reid_features(qf, gf, q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy(),
                                 metric=cfg.eval.metric, rerank=cfg.eval.rerank, max_rank=cfg.eval.max_rank,
                                 rerank_method=cfg.eval.rerank_method, chunk_size=cfg.eval.chunk_size, roc=roc)
        out = reid_scores(res)
        if roc:
            out["roc_curve"] = {"fpr": res["roc"]["curve_fpr"].tolist(), "tpr": res["roc"]["curve_tpr"].tolist()}
        if q_bad + g_bad:
            out["eval_bad_images"] = q_bad + g_bad
    return broadcast_object(out)


def evaluate(model: DCAL, sets: dict[str, Dataset], device: torch.device, cfg: DictConfig,
             roc: bool = False) -> dict[str, Any]:
    """The scores and, with them, what the cross-attentions do (:mod:`dcal.mechanism`: mark hits of the
    selections on the generated set, PWCA's distractor share on the first test / query images); ``roc``: Re-ID's
    same-person-or-not numbers too (:func:`evaluate_reid_model`)."""
    if cfg.task == "fgvc":
        return {**evaluate_fgvc(model, eval_loader(cfg, sets["test"]), device, cfg),
                **evaluate_mechanism(model, sets["test"], device, cfg)}
    return {**evaluate_reid_model(model, sets["query"], sets["gallery"], device, cfg, roc=roc),
            **evaluate_mechanism(model, sets["query"], device, cfg)}


# --------------------------------------------------------------------------------------------- eval only
def evaluate_checkpoint(cfg: DictConfig, model: DCAL, roc: bool = False) -> dict[str, Any]:
    """The scores of a loaded model (:func:`dcal.loading.load_model`) on its config's evaluation split(s);
    ``roc`` as in :func:`evaluate`."""
    device = pick_device(cfg.train.device, "train.device")
    model.to(device)
    sets = build_datasets(cfg, train=False)
    return evaluate(model, sets, device, cfg, roc=roc)
