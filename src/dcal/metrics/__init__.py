"""Evaluation metrics: a plain list of re-exports, one import per module (add yours as another line)."""

from dcal.metrics.reid import (  # noqa: F401
    NoValidQueryError,
    compute_distance,
    distance_source,
    eval_reid_features,
    evaluate_reid,
    nearest_gallery,
    reid_scores,
)
from dcal.metrics.rerank import RerankedDistances, re_ranking  # noqa: F401
