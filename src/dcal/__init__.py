"""dcal: Dual Cross-Attention Learning (CVPR 2022) on timm Vision Transformers."""

from dcal.model import (
    DCAL,
    DCALConfig,
    create_model,
    num_local_queries,
    random_derangement,
    rollout_cls_row,
    sample_pairs,
)

__version__ = "0.1.0"
__all__ = [
    "DCAL",
    "DCALConfig",
    "__version__",
    "create_model",
    "load_model",
    "predict",
    "num_local_queries",
    "random_derangement",
    "rollout_cls_row",
    "sample_pairs",
]

# Inference helpers are imported on first use: `import dcal` stays as light as the model code.
_LAZY = {"predict": "dcal.inference", "load_model": "dcal.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcal' has no attribute {name!r}")
