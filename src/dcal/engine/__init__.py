"""Training and evaluation engine (DeiT's ``main.py`` + ``engine.py`` shape), split by concern:

- :mod:`dcal.engine.build`: datasets, model, loss, optimizer, schedule, loaders, the model + loss step module;
- :mod:`dcal.engine.loop`: ``train_one_epoch``, the training loop, short and free of I/O and rank handling;
- :mod:`dcal.engine.evaluation`: top-1 / mAP, sharded over torchrun processes;
- :mod:`dcal.engine.run`: ``fit``, the run: torchrun process group, resume, checkpoints, metrics, logs.
"""

from dcal.engine.build import (
    ForwardLoss,
    build_criterion,
    build_datasets,
    build_model,
    build_optimizer,
    config_autocast,
    eval_loader,
    lr_factor,
    train_loader,
)
from dcal.engine.evaluation import (
    evaluate,
    evaluate_checkpoint,
    evaluate_fgvc,
    evaluate_reid_model,
    extract_features,
)
from dcal.engine.loop import EpochProgress, NonFiniteLossError, train_one_epoch
from dcal.engine.run import BEST_METRIC, SCORE_KEYS, fit, seed_everything
from dcal.run_folder import RunExistsError, read_metrics

__all__ = [
    "BEST_METRIC",
    "EpochProgress",
    "NonFiniteLossError",
    "RunExistsError",
    "SCORE_KEYS",
    "ForwardLoss",
    "build_criterion",
    "build_datasets",
    "build_model",
    "build_optimizer",
    "config_autocast",
    "eval_loader",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_fgvc",
    "evaluate_reid_model",
    "extract_features",
    "fit",
    "read_metrics",
    "lr_factor",
    "seed_everything",
    "train_loader",
    "train_one_epoch",
]
