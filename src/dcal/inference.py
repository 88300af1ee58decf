"""Use a trained model on your own images: load a run, read files and folders, predict classes.

* loading a model is :func:`dcal.loading.load_model` (``dcal.load_model``).
* :func:`list_images` / :func:`run_batches` – files and folders (recursive) read in batches by a DataLoader, with
  a progress bar on a terminal; a file that cannot be read is reported with the reason and skipped, the others go
  on. ``dcal embed`` / ``dcal search`` (``dcal.retrieval``) read images the same way.
* :func:`predict` – top-k classes with names and probabilities (``dcal.predict``, ``dcal predict``).

Probabilities: the paper's FGVC prediction is softmax(SA) + softmax(GLCA); :func:`predict` reports it divided by
the number of fused branches (the mean of the branch softmaxes), which sums to 1 and ranks the classes exactly as
the paper's sum does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dcal.data.images import list_image_files, open_rgb, printable, to_rgb
from dcal.distributed import pick_device
from dcal.loading import LoadedModel
from dcal.model import DCAL
from dcal.model.dcal import fusion_branches
from dcal.names import shorten


def default_transform(model: DCAL) -> Callable[[Image.Image], Tensor]:
    """Test transform for a bare model: resize to its input size, the backbone's normalisation.

    A model loaded with :func:`load_model` uses its run's own test transform instead (e.g. FGVC resize 550 +
    centre crop 448)."""
    from dcal.data.transforms import backbone_mean_std, build_transforms

    mean, std = backbone_mean_std(model.backbone_name or "")
    return build_transforms("fgvc", False, tuple(model.backbone.patch_embed.img_size), mean=mean, std=std)


# --------------------------------------------------------------------------------------------- reading
def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (any extension: a file that is not an image is reported when read) and, for folders, every
    image file below them (:func:`dcal.data.images.list_image_files`: recursive, sorted, the extensions of
    ``IMAGE_EXTENSIONS``). A path that does not exist is kept, to be reported as unreadable."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += list_image_files(p)
        else:
            out.append(p)
    return out


class ImageInputs(Dataset):
    """Paths and/or PIL images -> ``(tensor or None, index, error)``; never raises on a bad file.

    Files are read by :func:`dcal.data.images.open_rgb` (upright by EXIF, 8-bit RGB, a FIFO never opened), as the
    datasets read them; PIL images are taken as given, converted to RGB the same way."""

    def __init__(self, items: Sequence[str | Path | Image.Image], transform: Callable[[Image.Image], Tensor]):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        item = self.items[i]
        try:
            image = to_rgb(item) if isinstance(item, Image.Image) else open_rgb(item)
            return self.transform(image), i, ""
        except Exception as e:  # noqa: BLE001 - any decoding/transform failure is reported for this file only
            return None, i, f"{type(e).__name__}: {e}"


def _collate(batch: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(x, i) for x, i, _ in batch if x is not None]
    failed = [(i, err) for x, i, err in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], failed


def source_name(item: str | Path | Image.Image, index: int) -> str:
    return f"<image {index}>" if isinstance(item, Image.Image) else str(item)


def run_batches(
    fn: Callable[[Tensor], Tensor],
    items: Sequence[str | Path | Image.Image],
    transform: Callable[[Image.Image], Tensor],
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    desc: str = "images",
    progress: tqdm | None = None,
) -> tuple[Tensor | None, list[int], dict[int, str]]:
    """``fn`` on every readable item, in batches: (outputs of the readable items stacked on the CPU, their
    indices into ``items``, {index: reason} of the unreadable ones). ``progress``: a caller's bar to advance
    (one bar over several calls, e.g. the shards of ``dcal embed``) instead of a bar of this call's own."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader = DataLoader(ImageInputs(items, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    outputs: list[Tensor] = []
    done: list[int] = []
    failed: dict[int, str] = {}
    own = progress is None
    bar = tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True, disable=not sys.stderr.isatty()) \
        if own else progress
    with torch.inference_mode(), (bar if own else contextlib.nullcontext()):
        for images, idx, errors in loader:
            failed.update(errors)
            if images is not None:
                outputs.append(fn(images.to(device, non_blocking=True)).float().cpu())
                done += idx
            bar.update(len(idx) + len(errors))
    return (torch.cat(outputs) if outputs else None), done, failed


# -------------------------------------------------------------------------------------------- predict
@dataclass
class Prediction:
    """Top-k classes of one input (``error`` set and the lists empty when it could not be read)."""

    source: str
    indices: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


def _as_items(images_or_paths: Any) -> list[str | Path | Image.Image]:
    if isinstance(images_or_paths, (str, Path, Image.Image)):
        images_or_paths = [images_or_paths]
    items: list[str | Path | Image.Image] = []
    paths: list[str | Path] = []
    for it in images_or_paths:
        if isinstance(it, Image.Image):
            items += list_images(paths) + [it]
            paths = []
        else:
            paths.append(it)
    return items + list_images(paths)


def predict(
    model: DCAL | LoadedModel,
    images_or_paths: Tensor | str | Path | Image.Image | Iterable[str | Path | Image.Image],
    topk: int = 5,
    *,
    transform: Callable[[Image.Image], Tensor] | None = None,
    classes: Sequence[str] | None = None,
    fusion: str = "sa+glca",
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device | None = None,
) -> list[Prediction]:
    """Top-k classes of FGVC images: a normalised ``(B, 3, H, W)`` tensor, PIL images, files, or folders
    (every image below them, recursive).

    ``model`` is a :class:`DCAL` or what :func:`load_model` returns (then its run's transform and class names are
    used unless given). Unreadable files come back with ``error`` set; the others are predicted. Probabilities are
    the mean of the fused branches' softmaxes (module doc).
    """
    if isinstance(model, LoadedModel):
        transform = transform or model.transform
        classes = classes if classes is not None else model.classes
        model = model.model
    if model.cfg.task != "fgvc":
        raise ValueError("predict() needs an FGVC model; a Re-ID model embeds images (dcal embed / dcal search)")
    parts = fusion_branches(fusion, model.cfg.glca_blocks)
    num_classes = model.cfg.num_classes
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names given for a model with {num_classes} classes")
    k = min(int(topk), num_classes)
    if k < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    dev = pick_device(device, "--device") if device is not None else next(model.parameters()).device
    model.eval().to(dev)

    def top(images: Tensor) -> Tensor:  # (B, 2, k): probabilities, class indices
        p, i = (model.predict(images, fusion=fusion) / len(parts)).topk(k, dim=-1)
        return torch.stack([p, i.to(p.dtype)], dim=1)

    if isinstance(images_or_paths, Tensor):
        items: list[Any] = [f"<tensor {i}>" for i in range(images_or_paths.shape[0])]
        with torch.inference_mode():
            out = torch.cat([top(b.to(dev)).float().cpu() for b in images_or_paths.split(batch_size)])
        done, failed = list(range(len(items))), {}
    else:
        items = _as_items(images_or_paths)
        out, done, failed = run_batches(top, items, transform or default_transform(model), dev, batch_size,
                                        workers, desc="predict")
    preds = [Prediction(source_name(it, i), error=failed.get(i)) for i, it in enumerate(items)]
    for row, i in zip(out if out is not None else [], done, strict=True):
        idx = row[1].long().tolist()
        preds[i].indices = idx
        preds[i].classes = [classes[c] if classes is not None else str(c) for c in idx]
        preds[i].probabilities = row[0].tolist()
    return preds


# ----------------------------------------------------------------------------------------- formatting
def predictions_table(preds: Sequence[Prediction], max_name: int = 40) -> str:
    """A plain-text table: one row per input, its top-k as ``name probability`` (class names :func:`printable`,
    longer than ``max_name`` without their middle: :func:`dcal.names.shorten`)."""
    sources = [printable(p.source) for p in preds]
    width = min(60, max([len(s) for s in sources] + [4]))
    lines = [f"{'file':<{width}}  top-k (class probability)"]
    for p, src in zip(preds, sources, strict=True):
        src = src if len(src) <= width else "…" + src[-width + 1:]
        top = zip(p.classes, p.probabilities, strict=True)
        cells = f"ERROR {printable(p.error)}" if p.error else "  ".join(f"{shorten(c, max_name)} {pr:.3f}"
                                                                        for c, pr in top)
        lines.append(f"{src:<{width}}  {cells}")
    return "\n".join(lines)


CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP)


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """CSV of ``rows`` with ``\\n`` line ends; a text cell that starts like a formula gets a leading ``'``
    (OWASP's CSV-injection defence: a file or class name ``=HYPERLINK(...)`` stays text in a spreadsheet)."""
    buf = io.StringIO()
    w = csv.writer(buf)  # its \r\n row end makes it quote a cell holding \r (with "\n" alone it would not)
    lines = []
    for row in rows:
        buf.seek(0)
        buf.truncate()
        w.writerow(["'" + c if isinstance(c, str) and c.startswith(CSV_FORMULA_START) else c for c in row])
        lines.append(buf.getvalue()[:-2] + "\n")
    return "".join(lines)


def predictions_csv(preds: Sequence[Prediction]) -> str:
    """One row per input: ``path, error, class_1, index_1, prob_1, ..., class_k, index_k, prob_k``; a path that is
    not UTF-8 is written :func:`printable` (its odd bytes as ``\\xff``)."""
    k = max([len(p.indices) for p in preds] + [0])
    rows: list[list[Any]] = [["path", "error"] + [f"{c}_{r}" for r in range(1, k + 1)
                                                  for c in ("class", "index", "prob")]]
    for p in preds:
        cells: list[Any] = []
        for c, i, pr in zip(p.classes, p.indices, p.probabilities, strict=True):
            cells += [printable(c), i, f"{pr:.6f}"]
        rows.append([printable(p.source), printable(p.error or "")] + cells + [""] * (3 * k - len(cells)))
    return csv_text(rows)


def predictions_json(preds: Sequence[Prediction]) -> str:
    """A list of :class:`Prediction` records, names and classes :func:`printable` as in the CSV."""
    from dcal.checkpoint import json_text

    return json_text([{**asdict(p), "source": printable(p.source), "error": p.error and printable(p.error),
                       "classes": [printable(c) for c in p.classes]} for p in preds], indent=1)


def write_predictions(path: str | Path, preds: Sequence[Prediction]) -> Path:
    """``.csv`` or ``.json`` by the file's extension, written atomically."""
    from dcal.checkpoint import atomic_write_text

    path = Path(path)
    writers = {".csv": predictions_csv, ".json": predictions_json}
    if path.suffix.lower() not in writers:
        raise ValueError(f"--output {str(path)!r}: expected a .csv or .json file name")
    return atomic_write_text(path, writers[path.suffix.lower()](preds))
