"""The datasets dcal knows: one registration each, as fast-reid's ``DATASET_REGISTRY``.

A dataset is a reader plus one registration. ``data.dataset`` accepts exactly the names of :data:`DATASETS`, the
task (``fgvc`` / ``reid``) comes from the registration, and :func:`build_dataset` (what the engine, the commands
and users call) checks the split and the options and calls the reader::

    from dcal.data import register_dataset
    from dcal.data.fgvc import FGVCDataset

    @register_dataset("my_birds", task="fgvc")
    def read_my_birds(root, split, transform=None) -> FGVCDataset:
        ...

The built-in readers are registered in the table at the bottom by reference (``"module:function"``), so that this
module, and the config that validates ``data.dataset`` with it, import no torch; a reader's module is imported
when its dataset is first built. A dataset registered in user code must be registered before the config naming it
is loaded (import the module that registers it first).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dcal.vocabulary import TASKS

SPLITS = {"fgvc": ("train", "test"), "reid": ("train", "query", "gallery")}


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Args:
        name: the value of ``data.dataset``.
        task: ``fgvc`` (the reader returns an :class:`~dcal.data.fgvc.FGVCDataset`) or ``reid`` (a
            :class:`~dcal.data.reid.ReIDDataset`); see docs/design.md, "Adding a dataset".
        reader: ``reader(root, split, transform, **options)``, or ``"module:function"`` naming it.
        options: the reader's keyword arguments -> the ``data.*`` key that sets each from a config (a field of
            ``dcal.config.DataConfig``), or None for an option of the Python API only.
        needs_root: False for a generated set (``root`` may then be None).
    """

    name: str
    task: str
    reader: Callable[..., Any] | str
    options: Mapping[str, str | None] = field(default_factory=dict)
    needs_root: bool = True

    def load_reader(self) -> Callable[..., Any]:
        if callable(self.reader):
            return self.reader
        module, _, attr = self.reader.partition(":")
        return getattr(importlib.import_module(module), attr)


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    task: str,
    reader: Callable[..., Any] | str | None = None,
    *,
    options: Mapping[str, str | None] | None = None,
    needs_root: bool = True,
) -> Any:
    """Register a dataset reader under ``name``; used as a decorator when ``reader`` is left out.

    Raises:
        ValueError: ``name`` is already registered, or ``task`` is not one of ``TASKS``.
    """
    if task not in TASKS:
        raise ValueError(f"register_dataset({name!r}): task must be one of {TASKS}, got {task!r}")
    if name in DATASETS:
        raise ValueError(f"register_dataset({name!r}): a dataset of that name is already registered")

    def add(fn: Callable[..., Any] | str) -> Callable[..., Any] | str:
        DATASETS[name] = DatasetEntry(name, task, fn, dict(options or {}), needs_root)
        return fn

    return add if reader is None else add(reader)


def dataset_names(task: str | None = None) -> tuple[str, ...]:
    """The registered names (of one task), in the order they were registered."""
    return tuple(n for n, e in DATASETS.items() if task is None or e.task == task)


def dataset_entry(name: str) -> DatasetEntry:
    """The registration of ``name``; ValueError naming the registered ones when there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {dataset_names()}") from None


def task_of(name: str) -> str:
    """``"fgvc"`` or ``"reid"`` for a dataset name."""
    return dataset_entry(name).task


def build_dataset(name: str, root: Any, split: str, transform: Callable | None = None, **options: Any) -> Any:
    """One split of the dataset registered as ``name``.

    Args:
        name: a registered name (:func:`dataset_names`).
        root: the dataset's folder (see each reader for the layout it expects); None for a generated set.
        split: ``train`` / ``test`` (FGVC) or ``train`` / ``query`` / ``gallery`` (Re-ID).
        transform: applied to each PIL image.
        **options: the reader's options (:attr:`DatasetEntry.options`).
    """
    entry = dataset_entry(name)
    splits = SPLITS[entry.task]
    if split not in splits:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {splits}")
    extra = sorted(set(options) - set(entry.options))
    if extra:
        raise TypeError(f"{name}: unexpected keyword argument(s) {extra}; accepted: {sorted(entry.options)}")
    if entry.needs_root and root is None:
        raise ValueError(f"{name}: root is required")
    return entry.load_reader()(root, split, transform, **options)


# --------------------------------------------------------------------------------------- the built-in readers
_SYNTHETIC_OPTIONS = {"num_classes": "synthetic_num_classes", "train_per_class": "synthetic_train_per_class",
                      "test_per_class": "synthetic_test_per_class", "image_size": "synthetic_image_size",
                      "seed": "synthetic_seed", "task": "synthetic_task"}
register_dataset("cub", "fgvc", "dcal.data.fgvc:read_cub")
register_dataset("cars", "fgvc", "dcal.data.fgvc:read_cars")
register_dataset("aircraft", "fgvc", "dcal.data.fgvc:read_aircraft",
                 options={"annotation_level": "aircraft_annotation_level"})
register_dataset("folder", "fgvc", "dcal.data.fgvc:read_folder")
register_dataset("synthetic", "fgvc", "dcal.data.fgvc:read_synthetic", options=_SYNTHETIC_OPTIONS, needs_root=False)
register_dataset("market1501", "reid", "dcal.data.reid:read_market1501")
register_dataset("dukemtmc", "reid", "dcal.data.reid:read_dukemtmc")
register_dataset("msmt17", "reid", "dcal.data.reid:read_msmt17", options={"val_in_train": "msmt17_val_in_train"})
register_dataset("veri", "reid", "dcal.data.reid:read_veri")
register_dataset("reid_folder", "reid", "dcal.data.reid:read_reid_folder",
                 options={"camera_base": None, "default_camid": None})
