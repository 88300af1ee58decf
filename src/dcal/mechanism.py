"""What DCAL's cross-attentions do, measured: the numbers behind the paper's claims, at every evaluation.

* **Selection on the discriminative part** (GLCA, Eq. 2-3): on the generated set
  (``data.dataset=synthetic``, task ``mark``) the class lives in a small mark whose box is known. The share of
  the ⌈R·N⌉ selected patches that lie on the mark, for the attention **rollout** and for the **last layer's**
  pooled-feature attention, both computed from the same SA pass of the same model (whatever its own
  ``query_selection``, and for SA-only models too: the rollout needs no GLCA), against **chance**: the expected
  share under a random selection, i.e. the fraction of all patches on the mark, computed exactly instead of drawn.
* **PWCA's distractor share** (Eq. 4): how much of the attention (mean over heads) of the target's pooled-feature
  query (its class token, or the patch mean) goes to the distractor's tokens, per pair-wise block, with a fixed
  derangement (image i paired with image i+1). The paper says "little"; a self-pair gives exactly one half.

:func:`evaluate_mechanism` computes both under ``no_grad`` on the first :data:`MECHANISM_IMAGES` test images
and is called by :func:`dcal.engine.evaluation.evaluate`, so every evaluated epoch's ``metrics.jsonl`` record
carries ``mark_hit_rollout``, ``mark_hit_last_layer``, ``mark_hit_chance`` (percent, like top-1; synthetic mark
set only), ``pwca_share`` (one fraction per pair-wise block) and ``pwca_share_mean`` (models with PWCA), and
``mechanism_images``. The functions below it are pure functions of a model and a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from dcal.data.transforms import _hw
from dcal.model import DCAL
from dcal.model.rollout import select_top

MECHANISM_IMAGES = 64  # the fixed test subset: the first images of the test set
SELECTIONS = ("rollout", "last_layer")


# ------------------------------------------------------------------------------------ selection on the mark
def mark_box_in_input(box: Sequence[int], source_size: int, img_size: int | Sequence[int],
                      resize: int | Sequence[int] | None = None) -> tuple[float, float, float, float]:
    """The mark box ``(y0, x0, m)`` (top, left, side in pixels of the generated ``source_size`` square image) as
    ``(y0, x0, y1, x1)`` in pixels of the network input, through the FGVC test transform of
    :func:`dcal.data.transforms.build_transforms`: resize to ``resize`` (not aspect-preserving; None = straight to
    ``img_size``), then centre crop ``img_size`` (torchvision's anchor: ``round((resize - crop) / 2)``).

    Pixel edges scale exactly under the resize (pixel i spans [i, i+1)); the box is clipped to the crop.
    """
    h, w = _hw(img_size, "img_size")
    rh, rw = _hw(resize, "resize") if resize is not None else (h, w)
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    y0, x0, m = box
    sy, sx = rh / source_size, rw / source_size

    def clip(v: float, hi: int) -> float:
        return min(max(v, 0.0), float(hi))

    return (clip(y0 * sy - top, h), clip(x0 * sx - left, w), clip((y0 + m) * sy - top, h),
            clip((x0 + m) * sx - left, w))


def patches_on_boxes(boxes: Tensor, grid_size: Sequence[int], patch_size: Sequence[int],
                     stride: Sequence[int] | None = None) -> Tensor:
    """Which patches lie on each box, (B, N) bool, N = gh·gw in the ViT's row-major token order.

    A patch is **on** a box when at least half of its area lies inside the box. ``boxes``: (B, 4) as
    ``(y0, x0, y1, x1)`` in input pixels (:func:`mark_box_in_input`). Patch (r, c) covers rows
    [r·sy, r·sy + ph) and columns [c·sx, c·sx + pw) (``stride`` (sy, sx) defaults to the patch size; a smaller
    one is TransReID's overlapping patches).
    """
    gh, gw = grid_size
    ph, pw = patch_size
    sy, sx = stride if stride is not None else (ph, pw)
    boxes = boxes.float()

    def overlap(start: Tensor, size: int, lo: Tensor, hi: Tensor) -> Tensor:  # (B, n) overlap lengths
        return (torch.minimum(start + size, hi[:, None]) - torch.maximum(start, lo[:, None])).clamp_min(0)

    oy = overlap(torch.arange(gh, dtype=torch.float32, device=boxes.device) * sy, ph, boxes[:, 0], boxes[:, 2])
    ox = overlap(torch.arange(gw, dtype=torch.float32, device=boxes.device) * sx, pw, boxes[:, 1], boxes[:, 3])
    return (oy[:, :, None] * ox[:, None, :] >= 0.5 * ph * pw).flatten(1)


def mark_hits(selected: Tensor, on_mark: Tensor) -> Tensor:
    """Per image, the fraction of the selected patches (``selected``: (B, k) indices into the N patches) that
    lie on the mark (``on_mark``: (B, N) bool from :func:`patches_on_boxes`), (B,) in [0, 1]. A perfect
    selection scores min(k, patches on the mark) / k."""
    return on_mark.gather(1, selected).float().mean(dim=1)


def mark_hit_chance(on_mark: Tensor) -> Tensor:
    """The expected :func:`mark_hits` of a uniformly random selection of any k patches: the fraction of all N
    patches that lie on the mark, (B,)."""
    return on_mark.float().mean(dim=1)


@torch.no_grad()
def selection_scores(model: DCAL, images: Tensor) -> dict[str, Tensor]:
    """The pooled feature's row of the attention rollout (Eq. 2) and of the last block's attention alone (the
    ``last_layer`` ablation), each (B, N) over the patch tokens; the scores ``model``'s own ``query_selection``
    would rank (GLCA takes the top ⌈R·N⌉)."""
    model.eval()
    return model.scores_by_selection(images, SELECTIONS)


def on_mark_patches(model: DCAL, boxes: Sequence[Sequence[int]], source_size: int,
                    img_size: int | Sequence[int], resize: int | Sequence[int] | None) -> Tensor:
    """(B, N) bool: the patches of ``model``'s grid that lie on each image's mark box (``(y0, x0, m)`` in the
    generated image, mapped through the test transform)."""
    pe = model.backbone.patch_embed
    mapped = torch.tensor([mark_box_in_input(b, source_size, img_size, resize) for b in boxes])
    return patches_on_boxes(mapped, pe.grid_size, pe.patch_size, pe.proj.stride)


def selection_mark_hits(model: DCAL, images: Tensor, on_mark: Tensor) -> dict[str, Tensor]:
    """Per image (B,): ``rollout`` and ``last_layer`` mark hits of the top ⌈R·N⌉ patches (R: the model's
    ``top_r``) and ``chance``."""
    k = model.num_local_queries
    out = {name: mark_hits(select_top(s, k).cpu(), on_mark) for name, s in selection_scores(model, images).items()}
    return {**out, "chance": mark_hit_chance(on_mark)}


# ------------------------------------------------------------------------------------------ PWCA's share
@dataclass
class PWCAAttention:
    """The target's PWCA attention over the concatenated keys ``[own tokens; distractor tokens]``, read at the
    pooled feature's query: the class token's, or the patch mean for a backbone without one
    (:meth:`dcal.model.DCAL.pwca_attention`).

    Attributes:
        shares: (T, B), per pair-wise block, the fraction of the head-mean attention on the distractor.
        cls_row: (B, 2·n) block T's head-mean row (n = P + N tokens each, the P prefix tokens first in both halves).
        pairs: (B,) the distractor of each image.
        num_prefix_tokens: P.
    """

    shares: Tensor
    cls_row: Tensor
    pairs: Tensor
    num_prefix_tokens: int = 1

    @property
    def num_tokens(self) -> int:
        return self.cls_row.shape[1] // 2

    def patch_rows(self) -> tuple[Tensor, Tensor]:
        """Block T's attention on the target's N patches and on the distractor's, each (B, N)."""
        n, p = self.num_tokens, self.num_prefix_tokens
        return self.cls_row[:, p:n], self.cls_row[:, n + p:]


def fixed_derangement(batch: int, device: torch.device | None = None) -> Tensor:
    """Image i paired with image i+1 (the last with the first): a fixed derangement for ``batch`` >= 2."""
    if batch < 2:
        raise ValueError(f"a derangement needs at least 2 images, got {batch}")
    return torch.roll(torch.arange(batch, device=device), -1)


@torch.no_grad()
def pwca_attention(model: DCAL, images: Tensor, pairs: Tensor | None = None) -> PWCAAttention:
    """Run the PWCA stream's pair-wise blocks 1..T as in training (weights shared with SA, real distractors
    whatever ``pair_strategy``) in eval mode (no dropout) and read the attention of the target's pooled-feature
    query (Eq. 4) in each. ``pairs[i]``: the distractor of image i (default :func:`fixed_derangement`)."""
    if not model.cfg.pwca_blocks:
        raise ValueError("the model has no PWCA block (pwca_blocks=0)")
    model.eval()
    if pairs is None:
        pairs = fixed_derangement(images.shape[0], images.device)
    rows = model.pwca_attention(images, pairs)
    n_tok = rows[-1].shape[1] // 2
    shares = torch.stack([row[:, n_tok:].sum(-1) for row in rows])
    return PWCAAttention(shares, rows[-1], pairs, model.num_prefix_tokens)


def pwca_share(model: DCAL, images: Tensor, pairs: Tensor | None = None) -> Tensor:
    """(T, B): per pair-wise block and image, the share of the target's pooled-feature query's attention on the
    distractor."""
    return pwca_attention(model, images, pairs).shares


# ------------------------------------------------------------------------------------------- at evaluation
def _subset_images(dataset: Dataset, num_images: int, cfg: DictConfig) -> tuple[Tensor, list[int]]:
    """The first ``num_images`` readable test images (bad ones skipped as in evaluation) and their indices."""
    from dcal.data.robust import SkipBadImages, collate_skipping_bad

    subset = Subset(SkipBadImages(dataset, cfg.data.on_bad_image), range(min(num_images, len(dataset))))
    loader = DataLoader(subset, batch_size=cfg.eval.batch_size or cfg.train.batch_size, num_workers=0,
                        collate_fn=collate_skipping_bad)
    images, indices = [], []
    for batch in loader:
        if batch.data is not None:
            images.append(batch.data[0])
            indices += batch.indices.tolist()
    return (torch.cat(images) if images else torch.zeros(0)), indices


@torch.no_grad()
def evaluate_mechanism(model: DCAL, dataset: Dataset, device: torch.device, cfg: DictConfig,
                       num_images: int = MECHANISM_IMAGES) -> dict[str, Any]:
    """The mechanism numbers of the module doc on the first ``num_images`` test images, in chunks of the
    evaluation batch size (each PWCA chunk pairs its own images, so chunks hold at least 2 images).

    Mark hits need a dataset with ``mark_boxes`` and ``image_size`` (the synthetic ``mark`` set); the PWCA share
    needs ``pwca_blocks`` > 0 and 2 images. Returns ``{}`` when neither applies.
    """
    boxes = getattr(dataset, "mark_boxes", None)
    has_pwca = model.cfg.pwca_blocks > 0
    if boxes is None and not has_pwca:
        return {}
    images, indices = _subset_images(dataset, num_images, cfg)
    if len(indices) < (1 if boxes is not None else 2):
        return {}
    model.eval()
    chunks = max(1, math.ceil(len(indices) / (cfg.eval.batch_size or cfg.train.batch_size)))
    if has_pwca:
        chunks = min(chunks, len(indices) // 2)
    out: dict[str, Any] = {"mechanism_images": len(indices)}
    if boxes is not None:
        on_mark = on_mark_patches(model, [boxes[i] for i in indices], dataset.image_size, cfg.model.img_size,
                                  cfg.data.resize)
        hits = [selection_mark_hits(model, part.to(device), mark) for part, mark in
                zip(images.tensor_split(chunks), on_mark.tensor_split(chunks), strict=True)]
        for name in (*SELECTIONS, "chance"):
            out[f"mark_hit_{name}"] = 100.0 * float(torch.cat([h[name] for h in hits]).mean())
    if has_pwca and len(indices) >= 2:
        shares = torch.cat([pwca_share(model, part.to(device)).cpu() for part in images.tensor_split(chunks)], dim=1)
        per_block = shares.float().mean(dim=1)
        out["pwca_share"] = [float(v) for v in per_block]
        out["pwca_share_mean"] = float(per_block.mean())
    return out
