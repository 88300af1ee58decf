"""Datasets, transforms and samplers.

``build_dataset(name, root, split, transform=None)`` is the one entry point the engine, the CLI and users call.
FGVC datasets return ``(image, target)`` and expose ``classes`` and ``targets``; re-id datasets return
``(image, pid, camid)`` and expose ``pids``, ``camids`` (and ``targets`` = ``pids``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dcal.vocabulary import FGVC_DATASETS, REID_DATASETS


def task_of(name: str) -> str:
    """``"fgvc"`` or ``"reid"`` for a dataset name."""
    if name in FGVC_DATASETS:
        return "fgvc"
    if name in REID_DATASETS:
        return "reid"
    raise ValueError(f"unknown dataset {name!r}; expected one of {FGVC_DATASETS + REID_DATASETS}")


def build_dataset(name: str, root: str, split: str, transform: Callable | None = None, **kwargs: Any):
    """Build a dataset by name.

    Args:
        name: one of ``cub``, ``cars``, ``aircraft``, ``folder``, ``synthetic`` (FGVC) or ``market1501``,
            ``dukemtmc``, ``msmt17``, ``veri``, ``reid_folder`` (re-id).
        root: dataset root folder (see each reader for the layout it expects).
        split: ``train``/``test`` for FGVC; ``train``/``query``/``gallery`` for re-id.
        transform: applied to each PIL image.
    """
    task = task_of(name)
    if task == "fgvc":
        from dcal.data.fgvc import build_fgvc_dataset

        return build_fgvc_dataset(name, root, split, transform=transform, **kwargs)
    from dcal.data.reid import build_reid_dataset

    return build_reid_dataset(name, root, split, transform=transform, **kwargs)
