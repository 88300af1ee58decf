"""Pictures of what a trained model attends to (the paper's Fig. 3 and 4).

* :func:`rollout_maps` – the SA attention rollout of the pooled feature's row (Eq. 2; the class token's for a
  class-token ViT) and the patches GLCA selects as local queries (Fig. 3a/4a).
* :func:`glca_attention_maps` – what GLCA's local queries attend to: the mean over the local queries and heads of
  the first GLCA block's attention over the tokens of x_(L-1) (Fig. 3a).
* :func:`pwca_attention_maps` – for an image pair, the PWCA attention of the target's pooled-feature query split
  between the target's and the distractor's tokens, and the share that goes to the distractor (Fig. 3b/4b).

Attention probabilities are computed here explicitly, without autograd, from the blocks' weights; the model's own
forward never materialises probabilities it does not need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dcal.data.images import printable
from dcal.mechanism import pwca_attention
from dcal.model import DCAL
from dcal.names import wrap, wrap_all

WRONG = "tab:red"  # the title colour of a column with a wrong prediction


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalised tensors -> (B, H, W, 3) floats in [0, 1] for plotting."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def rollout_maps(model: DCAL, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rollout maps of the pooled feature's row, upsampled to the image size, (B, H, W) in [0, 1], and the GLCA
    selection mask (B, gh, gw) (all False when the model has no GLCA)."""
    model.eval()
    gh, gw = model.backbone.patch_embed.grid_size
    selected = torch.zeros(images.shape[0], gh * gw, dtype=torch.bool)
    if model.cfg.glca_blocks:
        idx = model(images, branches=("sa", "glca"))["selected"].cpu()
        selected.scatter_(1, idx, True)
    return patch_maps(model, model.cls_rollout(images), images.shape[-2:]), selected.view(-1, gh, gw).numpy()


def patch_maps(model: DCAL, scores: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """(B, N) scores over the patch tokens -> (B, H, W) maps upsampled to the image size, each scaled to [0, 1]."""
    gh, gw = model.backbone.patch_embed.grid_size
    maps = F.interpolate(scores.float().view(-1, 1, gh, gw), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()


def glca_attention_maps(model: DCAL, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What GLCA's local queries look at (Fig. 3a): the first GLCA block's attention over the N patch tokens of
    x_(L-1), averaged over the selected local queries (a class-token query, with ``glca_pool='cls'``, is left out)
    and the heads (:meth:`dcal.model.DCAL.glca_attention`). Returns the (B, H, W) maps in [0, 1] and the raw (B, N)
    means."""
    model.eval()
    selected, probs = model.glca_attention(images)
    scores = probs[:, -selected.shape[1]:].mean(dim=1)[:, model.num_prefix_tokens:]
    return patch_maps(model, scores, images.shape[-2:]), scores.cpu().numpy()


def pwca_attention_maps(model: DCAL, images: torch.Tensor, pairs: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The PWCA attention of each target image's pooled-feature query (class token, or patch mean) over the
    concatenated keys of the target and its distractor (Eq. 4), in the last PWCA block (T), averaged over heads
    (Fig. 3b/4b), from :func:`dcal.mechanism.pwca_attention` (the PWCA stream as in training, in eval mode).
    ``pairs[i]`` is the distractor of image ``i`` (default: the next image in the batch).

    Returns ``target`` and ``distractor`` (B, H, W) maps in [0, 1] (each over its own image's patches),
    ``share`` (B,): the fraction of that query's attention that goes to the distractor's tokens in block T, and
    ``share_mean`` (B,): that fraction averaged over the T pair-wise blocks.
    """
    pw = pwca_attention(model, images, pairs)
    target, distractor = pw.patch_rows()
    size = images.shape[-2:]
    return {
        "target": patch_maps(model, target, size),
        "distractor": patch_maps(model, distractor, size),
        "share": pw.shares[-1].cpu().numpy(),
        "share_mean": pw.shares.mean(0).cpu().numpy(),
        "pairs": pw.pairs.cpu().numpy(),
    }


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
    return save_attention_figure(
        path, images, [{"label": label, "images": images, "maps": m, "boxes": sel} for label, (m, sel) in rows.items()],
        titles, title="Attention rollout of the pooled feature (boxes: GLCA local queries)")


def attention_rows(model: DCAL, images: torch.Tensor, shown: np.ndarray,
                   pairs: torch.Tensor | None = None) -> list[dict[str, object]]:
    """The rows of :func:`save_attention_figure` for ``model``: SA rollout with the selected local queries, GLCA's
    local-query attention (with GLCA), and the PWCA attention on the target and on its distractor (with PWCA).
    ``shown``: the images as (B, H, W, 3) in [0, 1] (see :func:`denormalize`)."""
    maps, selected = rollout_maps(model, images)
    rows: list[dict[str, object]] = [{"label": "SA rollout", "images": shown, "maps": maps}]
    if model.cfg.glca_blocks:  # the patches GLCA selected, boxed on the rollout they were selected by
        rows[0].update(label="SA rollout\n(boxes: GLCA queries)", boxes=selected)
        rows.append({"label": "GLCA: local queries'\nattention", "images": shown,
                     "maps": glca_attention_maps(model, images)[0]})
    if model.cfg.pwca_blocks:
        pw = pwca_attention_maps(model, images, pairs)
        rows.append({"label": "PWCA: target query\non the target", "images": shown, "maps": pw["target"],
                     "captions": [f"to distractor {s:.1%}\n(mean of T {m:.1%})"
                                  for s, m in zip(pw["share"], pw["share_mean"], strict=True)]})
        rows.append({"label": "PWCA: target query\non the distractor", "images": shown[pw["pairs"]],
                     "maps": pw["distractor"]})
    return rows


def save_attention_picture(path: str | Path, models: Mapping[str, DCAL], images: torch.Tensor,
                           mean: Sequence[float], std: Sequence[float], labels: Sequence[str],
                           classes: Sequence[str] | None = None, truths: Sequence[str] | None = None) -> Path:
    """The attention picture of ``dcal visualize`` (one model) and ``dcal demo`` (SA-only and DCAL side by side):
    one column per image, titled by its ``labels`` and, when ``classes`` are given (FGVC), each model's predicted
    class (marked against ``truths`` when they are known: :func:`prediction_titles`); then each model's
    :func:`attention_rows`, labelled with the model's name when there are several.

    Args:
        models: name -> model, in the order of their rows and title lines.
        images: (B, 3, H, W), normalised with ``mean`` / ``std`` (the run's test transform).
    """
    shown = denormalize(images, mean, std)
    rows, predictions = [], {}
    for name, model in models.items():
        model.eval()
        own = attention_rows(model, images, shown)
        rows += own if len(models) == 1 else [{**row, "label": f"{name}: {row['label']}"} for row in own]
        if classes is not None:
            with torch.no_grad():
                predictions[name] = [classes[p] for p in model.predict(images).argmax(-1).tolist()]
    titles, colors = prediction_titles(labels, predictions, truths)
    return save_attention_figure(path, shown, rows, titles, title_colors=colors)


def prediction_titles(labels: Sequence[str], predictions: dict[str, Sequence[str]],
                      truths: Sequence[str] | None = None, width: int = 20) -> tuple[list[str], list[str]]:
    """Column titles and their colours: each ``label`` (a class or file name, wrapped, never cut to ambiguity:
    :func:`dcal.names.wrap_all`), then one line per model of ``predictions`` (model -> predicted class per column):
    ``model ✓`` when it equals the column's truth, ``model ✗ <predicted>`` when not, ``model: <predicted>`` when
    the truth is unknown. A column with a wrong prediction is titled in red."""
    titles, colors = [], []
    for j, label in enumerate(wrap_all(labels, width)):
        lines = [label]
        wrong = False
        for model, preds in predictions.items():
            if truths is None:
                lines.append(wrap(f"{model}: {preds[j]}", width))
            elif preds[j] == truths[j]:
                lines.append(f"{model} \u2713")
            else:
                wrong = True
                lines.append(wrap(f"{model} \u2717 {preds[j]}", width))
        titles.append("\n".join(lines))
        colors.append(WRONG if wrong else "black")
    return titles, colors


def save_attention_figure(path: str | Path, images: np.ndarray, rows: Sequence[dict[str, object]],
                          titles: Sequence[str] | None = None, title: str | None = None,
                          title_colors: Sequence[str] | None = None) -> Path:
    """One column per image: the image, then one row per entry of ``rows`` (from :func:`attention_rows`): a heat
    map over ``images`` (or the row's own, e.g. the distractors), optional ``boxes`` (B, gh, gw) and ``captions``.
    ``titles`` / ``title_colors``: one per column (see :func:`prediction_titles`)."""
    n = images.shape[0]
    fig, axes = new_figure(1 + len(rows), n, figsize=(2.2 * n, 2.4 * (1 + len(rows))))
    h, w = images.shape[1:3]
    for j in range(n):
        axes[0, j].imshow(images[j])
        # printable: a title from a file name that is not UTF-8 cannot be drawn as it is
        axes[0, j].set_title(printable(titles[j]) if titles else f"image {j}", fontsize=8,
                             color=title_colors[j] if title_colors else "black")
        for i, row in enumerate(rows, start=1):
            ax = axes[i, j]
            ax.imshow(row["images"][j])
            ax.imshow(row["maps"][j], cmap="jet", alpha=0.5)
            boxes = row.get("boxes")
            if boxes is not None:
                gh, gw = boxes.shape[1:]
                for r, c in zip(*np.nonzero(boxes[j]), strict=True):
                    ax.add_patch(Rectangle((c * w / gw, r * h / gh), w / gw, h / gh, fill=False,
                                           edgecolor="white", linewidth=0.8))
            if row.get("captions") is not None:
                ax.set_title(row["captions"][j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row["label"], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def new_figure(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure and its (rows, cols) axes, drawn off-screen: a ``Figure`` of its own, not pyplot's, so no GUI
    backend is chosen and matplotlib's global state (backend, open figures) stays as the caller left it."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Lay out and save as PNG (atomically: a reader never sees half a picture), marked as dcal's
    (:data:`PNG_SOFTWARE` in its ``Software`` text: what dcal may later replace, :func:`is_dcal_picture`)."""
    from dcal.checkpoint import atomic_write

    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": PNG_SOFTWARE}))
    return path


PNG_SOFTWARE = "dcal"


def is_dcal_picture(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that dcal saved (:func:`save_figure`); reads its text chunks only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and getattr(im, "text", {}).get("Software") == PNG_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def save_roc_figure(path: str | Path, fpr: Sequence[float], tpr: Sequence[float],
                    points: dict[float, tuple[float, float]], title: str = "same person or not") -> Path:
    """The ROC of a Re-ID evaluation (TPR against FPR on a log axis) with the operating points ``points``
    (target FPR -> (TPR, distance threshold)) marked and labelled."""
    fig, axes = new_figure(1, 1, (5.5, 4.2))
    ax = axes[0, 0]
    fpr_a, tpr_a = np.asarray(fpr, float), np.asarray(tpr, float)
    keep = fpr_a > 0
    ax.plot(fpr_a[keep], tpr_a[keep], color="tab:blue")
    for target, (t, thr) in points.items():
        ax.plot([target], [t], "o", color="tab:red")
        ax.annotate(f"FPR {target:g}: TPR {100 * t:.1f}%, d <= {thr:.4g}", (target, t), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min([1e-5, *points]) / 2, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (pairs of different identities)")
    ax.set_ylabel("true positive rate (same identity, other camera)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)
