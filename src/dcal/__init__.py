"""dcal: Dual Cross-Attention Learning (CVPR 2022) on timm Vision Transformers.

``import dcal`` is light (no torch, no timm): the subpackages (``dcal.data``, ``dcal.losses``, ``dcal.metrics``,
``dcal.engine``, ...) and the model API (``dcal.create_model``, ``dcal.DCAL``, ...) are imported on first use,
as attributes of the package (PEP 562), so ``import dcal; dcal.data.build_dataset(...)`` works like
``import timm; timm.data``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

SUBMODULES = (
    "ablation", "checkpoint", "cli", "config", "data", "demo", "distributed", "engine", "errors", "export",
    "gallery", "inference", "loading", "losses", "mechanism", "metrics", "model", "names", "pretrain", "report",
    "retrieval", "run_folder", "visualize", "vocabulary",
)
# public name -> the module that defines it
_ATTRIBUTES = {
    "DCAL": "dcal.model",
    "DCALConfig": "dcal.model",
    "create_model": "dcal.model",
    "num_local_queries": "dcal.model",
    "random_derangement": "dcal.model",
    "rollout_cls_row": "dcal.model",
    "sample_pairs": "dcal.model",
    "load_model": "dcal.loading",
    "predict": "dcal.inference",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from dcal.inference import predict  # noqa: F401
    from dcal.loading import load_model  # noqa: F401
    from dcal.model import (  # noqa: F401
        DCAL,
        DCALConfig,
        create_model,
        num_local_queries,
        random_derangement,
        rollout_cls_row,
        sample_pairs,
    )

__all__ = ["__version__", *SUBMODULES, *_ATTRIBUTES]


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f"dcal.{name}")  # the import also binds it on the package
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dcal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
