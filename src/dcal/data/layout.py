"""Datasets on disk: finding a dataset's folder, and the errors a reader raises when a layout does not match.

Every reader (:mod:`dcal.data.fgvc`, :mod:`dcal.data.reid`) finds its folder with :func:`find_dataset_root` and
raises these errors, so a missing or malformed dataset reads the same whatever the task: one line that names the
folder or file and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class DatasetFormatError(ValueError):
    """A dataset folder does not match the layout its reader expects.

    Raised at construction time (before any training starts) for a missing index file, a malformed line or an
    image listed in an index but absent on disk. The message names the file and what was expected.
    """


class DatasetNotFoundError(FileNotFoundError, DatasetFormatError):
    """The dataset's folder, or a folder or list file its layout needs, is missing. Both a ``FileNotFoundError``
    and a :class:`DatasetFormatError`, so that one ``except DatasetFormatError`` catches every layout problem."""


def find_dataset_root(root: str | os.PathLike, candidates: Sequence[str], required: Sequence[str], what: str) -> Path:
    """The folder holding every path of ``required``: ``root`` itself, else the first of ``root/<candidate>``
    (the dataset's conventional folder names, so that its parent folder may be given).

    Raises:
        DatasetNotFoundError: no such folder; the message names ``root``, the candidates and, for the folder
            that has most of them, the required paths it lacks.
    """
    base = Path(root).expanduser()
    expected = f"expected {', '.join(required)} in {base} or in one of its sub-folders {', '.join(candidates)}"
    if not base.exists():
        raise DatasetNotFoundError(f"{what}: dataset root {base} does not exist; {expected}")
    tried = [base] + [base / c for c in candidates]
    for folder in tried:
        if all((folder / r).exists() for r in required):
            return folder
    best = max(tried, key=lambda f: sum((f / r).exists() for r in required))
    missing = [str(best / r) for r in required if not (best / r).exists()]
    raise DatasetNotFoundError(f"{what}: missing {', '.join(missing)}; {expected}")
