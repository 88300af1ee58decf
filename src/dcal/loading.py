"""Loading a trained model: the one loader (``dcal.load_model``, every command that reads a model), above the
engine that builds it and the run folder whose files it reads.

* :func:`resolve_model_file` – which file of a run folder holds its model (best, else last; weights exports first).
* :func:`load_model` – that file, read as untrusted input, -> :class:`LoadedModel` (model in eval mode on a device,
  the run's config, class names, the run's test transform).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from dcal.checkpoint import StoredModel, check_fits, load_model_state
from dcal.config import load_saved_config
from dcal.data.transforms import build_transforms_from_config
from dcal.distributed import pick_device
from dcal.engine.build import build_model
from dcal.model import DCAL
from dcal.model.finetune import plain_shapes, plain_state
from dcal.run_folder import RUN_CHECKPOINTS


def resolve_model_file(run: str | Path | None = None, checkpoint: str | Path | None = None) -> Path:
    """The file to load: ``checkpoint`` itself, or the run folder's best, else last, model
    (:data:`dcal.run_folder.RUN_CHECKPOINTS`)."""
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run DIR or --checkpoint FILE")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        return path
    if not Path(run).is_dir():
        raise FileNotFoundError(f"run directory {str(run)!r} does not exist")
    found = [Path(run) / n for n in RUN_CHECKPOINTS if (Path(run) / n).is_file()]
    if not found:
        raise FileNotFoundError(f"run directory {run} holds no checkpoint (looked for {', '.join(RUN_CHECKPOINTS)})")
    return found[0]


def class_names(extra: dict[str, Any]) -> list[str] | None:
    """The class names a model file's ``extra`` metadata holds; None when it holds none (e.g. Re-ID runs, whose
    classes are training identities)."""
    names = extra.get("classes")
    return [str(c) for c in names] if isinstance(names, list) else None


@dataclass
class LoadedModel:
    """A trained model with what is needed to use it: its run's config, class names and test transform."""

    model: DCAL
    cfg: DictConfig  # the run's resolved config (with the overrides given to :func:`load_model`)
    classes: list[str] | None
    checkpoint: Path  # the file it was read from

    @property
    def task(self) -> str:
        return self.model.cfg.task

    @cached_property
    def transform(self) -> Callable[[Image.Image], Tensor]:
        """The run's test transform (e.g. FGVC resize 550 + centre crop 448)."""
        return build_transforms_from_config(self.cfg, train=False)


def load_model(run: str | Path | None = None, checkpoint: str | Path | None = None, device: str | None = None,
               overrides: Sequence[str] = ()) -> LoadedModel:
    """The model of a run folder (``run``: its best, else last, model file) or of a model file (``checkpoint``:
    a ``.pth`` training state or a ``.safetensors`` export), in eval mode on ``device`` (default: the GPU if any),
    with its config (``overrides`` may change data/eval keys), class names and test transform; the file is read
    once.

    The file is untrusted input: its stored config is checked like a recipe (``load_saved_config``: no code,
    no download, no file named in it is read), and the model it describes is built on the ``meta`` device and
    compared with the file's tensor shapes before the real model is allocated, so a small file cannot ask for a
    large model. The config is the one authority for the model's shape."""
    path = resolve_model_file(run, checkpoint)
    stored = StoredModel(path)
    cfg = load_saved_config(stored.config_yaml, str(path), overrides)
    head = "backbone.head.weight" if cfg.task == "fgvc" else "sa_neck.classifier.weight"
    shape = stored.shapes.get(head)
    if shape is None or len(shape) != 2 or shape[0] < 1:
        raise ValueError(f"checkpoint {str(path)!r} has no {head!r} of shape (classes, width): not a dcal "
                         f"{cfg.task} model")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        skeleton = build_model(cfg, shape[0])
    # a model.lora run's .pth holds adapter factors: they are merged into a plain model (dcal.model.finetune)
    check_fits(skeleton, plain_shapes(stored.shapes), path)
    model = build_model(cfg, shape[0])
    load_model_state(model, plain_state(stored.state_dict(), cfg.model.lora, str(path)), path)
    model.eval().to(pick_device(device, "--device"))
    return LoadedModel(model, cfg, class_names(stored.extra), path)
