"""Pretraining as a first-class step: train an SA-only backbone once, cache it, fine-tune every run from it.

The paper never trains DCAL from scratch: every result fine-tunes a pretrained backbone, whose attention is
already structured when GLCA's rollout selection and PWCA's distractor first see it. Where no pretrained weights
can be downloaded, dcal makes its own: a recipe names a pretraining recipe (``model.pretrain: FILE.yaml``, or
``dcal ablation --pretrain FILE.yaml``), and

* :func:`pretrain_config` loads that recipe as an **SA-only** run (no GLCA, no PWCA: only the backbone is kept)
  writing into a cache folder beside the runs;
* :func:`ensure_pretrained` trains it there once, **reuses** it while its config is unchanged, **resumes** it
  when it was interrupted, and **refuses** a folder holding a run of another config (naming the keys that
  differ; delete the folder to retrain);
* :func:`resolve_pretrain` points ``model.pretrained_file`` at that run folder, from which
  ``dcal.model.load_pretrained_file`` takes the backbone of the **last** epoch (``last.safetensors``: never
  a checkpoint selected on an evaluation split).

Every variant and seed of an ablation fine-tunes from the same checkpoint; their seeds vary the fine-tuning only
(the pretraining run has the seed of its own recipe).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dcal.config import ConfigError, default_config, load_config
from dcal.run_folder import (
    RunLock,
    has_checkpoint,
    is_finished,
    nothing_saved,
    other_config_changes,
    read_config,
    read_config_text,
)

logger = logging.getLogger(__name__)
SA_ONLY = ("model.glca_blocks=0", "model.pwca_blocks=0", "eval.fusion=sa")
CACHE_FOLDER = "pretrain"  # beside the runs: <parent of output_dir (or of the ablation folder)>/pretrain/<stem>


def pretrain_config(recipe: str | Path, output_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The pretraining recipe as an SA-only config writing to ``output_dir``."""
    recipe = Path(recipe)
    try:
        cfg = load_config(recipe, [*overrides, *SA_ONLY, f"output_dir={output_dir}"])
    except ConfigError as e:
        raise ConfigError(f"pretraining recipe {recipe}: {e}") from None
    if cfg.model.pretrain:
        raise ConfigError(f"pretraining recipe {recipe} names model.pretrain itself: chains of pretraining runs are "
                          "not supported (set model.pretrained_file to the earlier run's folder instead)")
    return cfg


def pretrain_state(cfg: Any) -> str:
    """``"absent"``, ``"finished"`` or ``"started"`` for the run folder ``cfg.output_dir``; raises
    ``FileExistsError`` when it holds a run of another config."""
    folder = Path(cfg.output_dir)
    if read_config_text(folder) is None or nothing_saved(folder):  # nothing trained there yet, of any config
        return "absent"
    # a key added by a later dcal counts as its default
    diff = other_config_changes(folder, OmegaConf.to_container(cfg), OmegaConf.to_container(default_config()))
    if diff:
        raise FileExistsError(
            f"{folder} holds a pretraining run of another config ({'; '.join(diff[:6])}"
            f"{' ...' if len(diff) > 6 else ''}): delete that folder to pretrain again with the new recipe, or "
            "restore the recipe it was trained with"
        )
    if is_finished(folder):
        return "finished"
    return "started" if has_checkpoint(folder) else "absent"


def ensure_pretrained(cfg: Any) -> Path:
    """Train the SA-only run ``cfg`` (see :func:`pretrain_config`) unless it is already there; returns its folder.

    Reuses a finished run of the same config, resumes an interrupted one, trains a new one; refuses a folder
    holding a run of another config. Under torchrun only a finished run can be used (pretrain it first, in one
    process or as its own torchrun command), since the processes would each start the same training.
    """
    folder = Path(cfg.output_dir)
    from dcal import distributed

    if distributed.env_world_size() > 1:
        return _ensure_pretrained(cfg, folder)
    lock = RunLock(folder)
    with lock, lock.lend():  # held before the folder is read or repaired, lent to fit
        return _ensure_pretrained(cfg, folder)


def _ensure_pretrained(cfg: Any, folder: Path) -> Path:
    from dcal import distributed
    from dcal.engine import fit

    state = pretrain_state(cfg)
    if state == "finished":
        logger.info(f"pretrained backbone: reusing {folder} (finished, same config)")
        return folder
    if distributed.env_world_size() > 1:
        raise RuntimeError(f"the pretraining run {folder} is {state == 'started' and 'unfinished' or 'missing'}: "
                           f"run it first (dcal train --config RECIPE output_dir={folder} "
                           "model.glca_blocks=0 model.pwca_blocks=0 eval.fusion=sa), then start torchrun again")
    logger.info(f"pretrained backbone: {'resuming' if state == 'started' else 'training'} the SA-only run {folder} "
                f"({cfg.train.epochs} epochs of {cfg.data.dataset})")
    fit(cfg, resume=True)  # resumes a started run; starts an absent one (a start that saved nothing, redone)
    return folder


def cache_folder(recipe: str | Path, beside: str | Path) -> Path:
    """Where the pretraining recipe ``recipe`` is trained: ``<beside>/pretrain/<recipe stem>``. The stem comes
    from the user, so it must be a plain name (no ``..``, no path): a write never lands outside that folder."""
    stem = Path(recipe).stem
    if stem in ("", ".", "..") or not all(c.isalnum() or c in "-_." for c in stem):
        raise ConfigError(f"pretraining recipe {str(recipe)!r}: its file name {stem!r} cannot name the pretraining "
                          "folder (use letters, digits, '-', '_' and '.')")
    return Path(beside) / CACHE_FOLDER / stem


def resolve_pretrain(cfg: Any, folder: str | Path | None = None, train: bool = True) -> Any:
    """``cfg`` with ``model.pretrain`` (a recipe) replaced by ``model.pretrained_file`` = its pretrained run folder,
    which is trained first if needed (``train=False``: only named, for checking the job before it runs); ``folder``
    defaults to :func:`cache_folder` beside ``output_dir``. A config without ``model.pretrain`` is returned as it
    is."""
    recipe = cfg.model.pretrain
    if not recipe:
        return cfg
    folder = Path(folder) if folder is not None else cache_folder(recipe, Path(cfg.output_dir).parent)
    pre = pretrain_config(recipe, folder)
    if train:
        run = ensure_pretrained(pre)
    else:
        check_backbones_match(cfg, pre)
        pretrain_state(pre)  # a folder holding another config's pretraining is refused now, not after
        run = folder
    cfg = cfg.copy()
    cfg.model.pretrain, cfg.model.pretrained_file = None, str(run)
    return cfg


def train_stages(cfg: Any, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` as ``dcal train`` does: with a pretraining stage (``model.pretrain``), the whole job is checked
    first (the fine-tuning's output folder, its data, its backbone against the pretraining recipe's), then the
    pretraining is trained or reused (:func:`resolve_pretrain`), then the fine-tuning runs; without one, just
    ``fit``. Returns the final record."""
    from dcal import distributed
    from dcal.engine import build_datasets, fit
    from dcal.run_folder import check_run_folder

    if cfg.model.pretrain:
        planned = resolve_pretrain(cfg, train=False)
        distributed.on_main(lambda: check_run_folder(Path(planned.output_dir), planned, resume))
        build_datasets(planned)
        cfg = resolve_pretrain(cfg)
    return fit(cfg, resume=resume)


def check_backbones_match(cfg: Any, pre: Any) -> None:
    """The fine-tuning config ``cfg`` builds the backbone that the pretraining config ``pre`` trains (same
    tensors and shapes, the position embedding and classifier aside: those are resampled or dropped), checked
    on the meta device (no memory, no weights read) before anything trains; ``ConfigError`` naming both."""
    import torch

    from dcal.engine.build import build_model

    def shapes(c: Any) -> dict[str, tuple[int, ...]]:
        c = c.copy()
        c.model.pretrained, c.model.pretrained_file, c.model.pretrain = False, None, None
        with torch.device("meta"):
            backbone = build_model(c, 2).backbone
        return {k: tuple(v.shape) for k, v in backbone.state_dict().items()
                if not k.startswith(("pos_embed", "head", "fc_norm")) and "rope" not in k}

    a, b = shapes(cfg), shapes(pre)
    diff = sorted(set(a) ^ set(b)) + [f"{k} {a[k]} vs {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if diff:
        raise ConfigError(f"model.backbone: the fine-tuning backbone ({cfg.model.backbone}, "
                          f"timm_kwargs {dict(cfg.model.timm_kwargs)}) is not the one the pretraining recipe "
                          f"{cfg.model.pretrain} trains ({pre.model.backbone}, timm_kwargs "
                          f"{dict(pre.model.timm_kwargs)}): {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}. "
                          "Give backbone overrides to both stages, or edit the recipes")


def describe_backbone(model: dict[str, Any]) -> str:
    """One line saying where a run's backbone weights came from (for reports and ablation tables), from the
    ``model`` section of its config as a plain dict."""
    name, source = model.get("backbone"), model.get("pretrained_file")
    if source:
        p = read_config(source)
        if p is not None:
            d, t = p.get("data") or {}, p.get("train") or {}
            part = f", classes {d['classes']}" if d.get("classes") is not None else ""
            if d.get("dataset") == "synthetic":
                part += f", {d.get('synthetic_task', 'mark')} task"
            splits = "+".join(d.get("train_splits") or ["train"])
            return (f"{name} pretrained SA-only by dcal in {source} ({d.get('dataset')} {splits}{part}, "
                    f"{t.get('epochs')} epochs, seed {t.get('seed')})")
        return f"{name} with weights from {source}"
    if model.get("pretrained"):
        return f"{name} with timm's pretrained weights"
    return f"{name} from scratch (random initialisation)"
