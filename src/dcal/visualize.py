"""Pictures: attention rollout (paper Fig. 3/4) and the GLCA local queries it selects."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dcal.model import DCAL  # noqa: E402


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) floats in [0, 1] for plotting."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def rollout_maps(model: DCAL, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rollout CLS maps upsampled to the image size, (B, H, W) in [0, 1], and the GLCA selection mask
    (B, gh, gw) (all False when the model has no GLCA)."""
    model.eval()
    gh, gw = model.backbone.patch_embed.grid_size
    scores = model.cls_rollout(images)
    maps = scores.view(-1, 1, gh, gw)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    selected = torch.zeros(images.shape[0], gh * gw, dtype=torch.bool)
    if model.cfg.glca_blocks:
        idx = model(images, branches=("sa", "glca"))["selected"].cpu()
        selected.scatter_(1, idx, True)
    return maps.cpu().numpy(), selected.view(-1, gh, gw).numpy()


def save_rollout_figure(
    path: str | Path,
    images: np.ndarray,
    rows: dict[str, tuple[np.ndarray, np.ndarray]],
    titles: Sequence[str] | None = None,
) -> Path:
    """One column per image: the image, then for each model its rollout heat map with the selected GLCA
    query patches outlined.

    Args:
        images: (B, H, W, 3) in [0, 1].
        rows: model label -> (maps (B, H, W), selection masks (B, gh, gw)) from :func:`rollout_maps`.
        titles: one caption per image (e.g. class names / predictions).
    """
    n = images.shape[0]
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(2.2 * n, 2.3 * (1 + len(rows))), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        axes[0, j].set_title(titles[j] if titles else f"image {j}", fontsize=8)
        for i, (label, (maps, sel)) in enumerate(rows.items(), start=1):
            ax = axes[i, j]
            ax.imshow(images[j])
            ax.imshow(maps[j], cmap="jet", alpha=0.5)
            h, w = images.shape[1:3]
            gh, gw = sel.shape[1:]
            for r, c in zip(*np.nonzero(sel[j]), strict=True):
                ax.add_patch(plt.Rectangle((c * w / gw, r * h / gh), w / gw, h / gh, fill=False,
                                           edgecolor="white", linewidth=0.8))
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Attention rollout of the CLS token (boxes: GLCA local queries)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
