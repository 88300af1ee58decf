"""Evaluation metrics: a plain list of re-exports, one import per module (add yours as another line)."""

from dcal.metrics.reid import (  # noqa: F401
    NoValidQueryError,
    compute_distance,
    eval_reid_features,
    evaluate_reid,
    re_ranking,
    reid_scores,
)
