"""Datasets, transforms and samplers.

``build_dataset(name, root, split, transform=None)`` is the one entry point the engine, the CLI and users call;
a dataset is a reader plus one registration (:mod:`dcal.data.registry`). FGVC datasets return ``(image, target)``
and expose ``classes`` and ``targets``; re-id datasets return ``(image, pid, camid)`` and expose ``pids``,
``camids`` (and ``targets`` = ``pids``).
"""

from __future__ import annotations

from dcal.data.registry import DATASETS, build_dataset, dataset_names, register_dataset, task_of

__all__ = ["DATASETS", "build_dataset", "dataset_names", "register_dataset", "task_of"]
