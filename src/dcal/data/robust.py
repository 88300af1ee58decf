"""Bad-image tolerance: a dataset wrapper and a collate function that skip unreadable files.

A corrupt, truncated, zero-byte or non-image file inside a dataset should not kill a nine-hour run. With
``on_bad_image="skip"`` (``data.on_bad_image``) :class:`SkipBadImages` returns a :class:`BadItem` naming the
file instead of raising; :func:`collate_skipping_bad` leaves such items out of the batch and hands their names
to the training loop, which warns, counts them in the epoch's record and stops if most files are bad (a
broken folder must not look like an empty epoch): mid-epoch once at least :data:`MIN_IMAGES_TO_JUDGE` images were
read (a few bad files drawn together early are no evidence), and at the end of the epoch over all it read. With
``"error"`` the first bad file stops the run with :class:`BadImageError` naming it.

Every item of the wrapped dataset is ``(index, sample)`` so that evaluation knows which samples survived
(Re-ID needs the pid and camera of each kept feature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from dcal.vocabulary import ON_BAD_IMAGE

# images read before a mid-epoch "looks broken" verdict: with 20 % bad files the chance that more than half of
# 50 are bad is below 1e-5, while a folder where everything is bad still stops within the first 50 images
MIN_IMAGES_TO_JUDGE = 50
# what PIL and the transforms raise on a file that is not a readable image (UnidentifiedImageError and
# "image file is truncated" are OSErrors; some decoders raise SyntaxError/ValueError on corrupt headers)
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """A dataset image cannot be read (``data.on_bad_image=error``) or most images of a dataset are bad."""


class BadItem(NamedTuple):
    index: int
    path: str
    reason: str


class LoadedBatch(NamedTuple):
    """A collated batch of the good items (``data`` is None when none was good), their dataset indices and
    the ``(path, reason)`` of the items skipped."""

    data: Any
    indices: torch.Tensor
    bad: list[tuple[str, str]]


class SkipBadImages(Dataset):
    """``dataset`` whose items are ``(index, sample)``, or a :class:`BadItem` when the image is unreadable."""

    def __init__(self, dataset: Dataset, on_bad_image: str = "skip") -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.dataset = dataset
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def path(self, index: int) -> str:
        paths = getattr(self.dataset, "paths", None)
        return str(paths[index]) if paths is not None else f"item {index}"

    def __getitem__(self, index: int) -> tuple[int, Any] | BadItem:
        try:
            return index, self.dataset[index]
        except BAD_IMAGE_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
            if self.on_bad_image == "error":
                raise BadImageError(
                    f"cannot read image {self.path(index)} ({reason}); set data.on_bad_image=skip to skip such "
                    "files with a warning"
                ) from e
            return BadItem(index, self.path(index), reason)


def collate_skipping_bad(items: Sequence[tuple[int, Any] | BadItem]) -> LoadedBatch:
    """Collate the good items of a batch; report the bad ones."""
    good = [it for it in items if not isinstance(it, BadItem)]
    bad = [(it.path, it.reason) for it in items if isinstance(it, BadItem)]
    data = default_collate([sample for _, sample in good]) if good else None
    return LoadedBatch(data, torch.tensor([i for i, _ in good], dtype=torch.long), bad)


def check_bad_fraction(n_bad: int, n_seen: int, examples: Sequence[str], what: str,
                       min_seen: int = MIN_IMAGES_TO_JUDGE) -> None:
    """Stop when more than half of the images seen so far are bad, once at least ``min_seen`` were seen (pass 1
    at the end of an epoch: all it read is the evidence): a broken folder."""
    if n_seen >= min_seen and n_bad * 2 > n_seen:
        shown = ", ".join(examples[:3]) + (" ..." if len(examples) > 3 else "")
        raise BadImageError(
            f"{n_bad} of the {n_seen} {what} images read so far are unreadable (e.g. {shown}): the dataset "
            "looks broken; fix or remove these files"
        )
