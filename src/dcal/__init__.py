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
    "num_local_queries",
    "random_derangement",
    "rollout_cls_row",
    "sample_pairs",
]
