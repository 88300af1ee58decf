"""Project configuration: OmegaConf structured configs for FGVC and Re-ID, loading, validation, derivation.

``load_config(path, overrides)`` starts from the defaults below, merges a YAML file and ``key=value``
overrides (OmegaConf dotlist syntax, e.g. ``train.epochs=5``, ``model.img_size=[256,128]``), rejects unknown
keys and wrongly typed values with a :class:`ConfigError` naming the dotted key (and suggesting close
matches), then derives the task defaults:

- ``task`` from ``data.dataset`` (``dcal.data.task_of``);
- ``model.top_r`` None -> 0.1 (FGVC) / 0.3 (Re-ID), the paper's R;
- ``train.lr`` None -> ``train.base_lr * global batch / 512`` for FGVC (the paper's lr = 5e-4 / 512 x
  batch size; the global batch is ``train.batch_size`` x the number of torchrun processes, as DeiT scales it)
  and 0.008 for Re-ID (the paper's fixed Re-ID lr, not batch-scaled);

and validates choices and ranges. The result is a read-only-keyed (struct) ``DictConfig``; its values after
derivation are what a run used, so :func:`save_config` writes a file that reloads to the same config.

Recipes and the configs stored in checkpoints are untrusted text, read the same way (:func:`read_yaml`,
:func:`load_saved_config`): YAML without anchors/aliases or duplicate keys, no OmegaConf interpolation
(``${...}``), ``model.backbone`` a plain timm model name, ``model.timm_kwargs`` an allow-list of architecture keys
(:data:`TIMM_KWARGS`: nothing that makes timm read a file or the network), every number finite and in range.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dcal import vocabulary as vocab

logger = logging.getLogger(__name__)
FGVC_LR_REFERENCE_BATCH = 512  # lr = base_lr * batch_size / 512 (paper §4.1)
REID_DEFAULT_LR = 0.008  # paper §4.1, Re-ID

# config key -> the values it takes
CHOICES: dict[str, tuple[str, ...]] = {
    "data.random_erasing_mode": vocab.ERASING_MODES,
    "data.aircraft_annotation_level": vocab.AIRCRAFT_LEVELS,
    "data.synthetic_task": vocab.SYNTHETIC_TASKS,
    "model.query_selection": vocab.QUERY_SELECTIONS,
    "model.pair_strategy": vocab.PAIR_STRATEGIES,
    "model.glca_pool": vocab.GLCA_POOLS,
    "loss.weighting": vocab.LOSS_WEIGHTINGS,
    "train.optimizer": vocab.OPTIMIZERS,
    "train.scheduler": vocab.SCHEDULERS,
    "train.sampler": vocab.SAMPLERS,
    "train.amp": tuple(vocab.AMP_PRECISION),
    "train.device": vocab.DEVICES,
    "data.on_bad_image": vocab.ON_BAD_IMAGE,
    "eval.fusion": vocab.FUSIONS,
    "eval.reid_feature": vocab.REID_FEATURES,
    "eval.metric": vocab.RETRIEVAL_METRICS,
    "eval.rerank_method": vocab.RERANK_METHODS,
}

# A timm model name, optionally with a pretrained tag (``vit_base_patch16_224.augreg_in21k``): no ``hf-hub:`` /
# ``local-dir:`` prefix, no path, so that the name alone never makes timm read a file or a hub config.
BACKBONE_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)?")
MAX_BLOCKS = 128  # depth and model.glca_blocks: ViT-22B has 48 blocks
MAX_IMG_SIDE = 8192  # model.img_size / data.resize sides (8192 / 16 = 512 x 512 patches, beyond any attention)
MAX_SYNTHETIC_BYTES = 4 << 30  # the synthetic set is generated in memory at construction
MAX_LORA_RANK = 4096

# model.timm_kwargs: key -> (type, low, high, nullable); ints and floats in [low, high] (floats finite), bools as
# bools, strings one of TIMM_STRING_CHOICES. Only architecture keys of timm's VisionTransformer / Eva that DCAL can
# use: nothing that loads (checkpoint_path, pretrained_cfg, pretrained_cfg_overlay, cache_dir, ...: timm would
# read, even unpickle, another file), nothing DCAL refuses (dynamic_img_size, patch_drop_rate), no callables.
TIMM_KWARGS: dict[str, tuple[type, float, float, bool]] = {
    "class_token": (bool, 0, 0, False),
    "reg_tokens": (int, 0, 64, False),  # VisionTransformer's registers
    "num_reg_tokens": (int, 0, 64, False),  # Eva's
    "global_pool": (str, 0, 0, False),
    "depth": (int, 1, MAX_BLOCKS, False),
    "embed_dim": (int, 1, 16384, False),
    "num_heads": (int, 1, 256, False),
    "patch_size": (int, 1, 1024, False),
    "mlp_ratio": (float, 1e-3, 64.0, False),
    "qkv_bias": (bool, 0, 0, False),
    "qk_norm": (bool, 0, 0, False),
    "proj_bias": (bool, 0, 0, False),
    "scale_attn_norm": (bool, 0, 0, False),
    "scale_mlp_norm": (bool, 0, 0, False),
    "init_values": (float, 1e-12, 10.0, True),  # layer scale; null = none
    "no_embed_class": (bool, 0, 0, False),
    "pre_norm": (bool, 0, 0, False),
    "final_norm": (bool, 0, 0, False),
    "fc_norm": (bool, 0, 0, True),  # null = timm's default for the pooling
    "drop_rate": (float, 0.0, 0.999, False),
    "pos_drop_rate": (float, 0.0, 0.999, False),
    "proj_drop_rate": (float, 0.0, 0.999, False),
    "attn_drop_rate": (float, 0.0, 0.999, False),
}
TIMM_STRING_CHOICES = {"global_pool": vocab.BACKBONE_POOLS}
OWN_KEYS = {"img_size": "model.img_size", "drop_path_rate": "model.drop_path_rate", "num_classes": "data.num_classes",
            "pretrained": "model.pretrained"}  # timm arguments that have their own config key


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type, bad value. The message names the dotted key."""


@dataclass
class DataConfig:
    dataset: str = "cub"  # a name registered in dcal.data.registry.DATASETS (dcal.data.dataset_names())
    root: str = "data"  # dataset folder: override with data.root=/path/to/dataset
    resize: Any = 550  # pre-crop resize: int or [H, W]; None = none (FGVC: straight to img_size)
    hflip: float = 0.5  # horizontal flip probability (training)
    pad: int = 10  # Re-ID: zero padding before the random crop
    random_erasing: float = 0.5  # Re-ID: random erasing probability
    random_erasing_mode: str = "pixel"  # pixel (N(0,1) noise, TransReID) | mean (the mean colour)
    mean: list[float] | None = None  # None = the backbone's pretrained normalisation
    std: list[float] | None = None
    num_classes: int | None = None  # None = from the training set (dataset.num_classes / identities)
    synthetic_num_classes: int = 6
    synthetic_train_per_class: int = 100
    synthetic_test_per_class: int = 30
    synthetic_image_size: int = 64
    synthetic_seed: int = 0
    synthetic_task: str = "mark"  # mark (fine-grained: classes differ in a small mark) | coarse (shape x texture)
    msmt17_val_in_train: bool = True  # MSMT17: train on train + val (the usual protocol)
    aircraft_annotation_level: str = "variant"  # variant (100) | family (70) | manufacturer (30)
    on_bad_image: str = "skip"  # skip (warn, count, go on; stop if most are bad) | error (stop at the first)
    # parts of a data set (dcal.data.subsets): FGVC classes / Re-ID identities as a list of ids or names or an
    # id range string ("1-50", "1-10,20"); null = all. train_splits: the splits whose images are trained on
    # (FGVC; [train, test] pretrains on every image of the selected classes)
    classes: Any = None
    identities: Any = None
    train_splits: list[str] = field(default_factory=lambda: ["train"])


def _check_data(cfg: DictConfig) -> None:
    """:class:`DataConfig`'s constraints (``data.resize`` against ``model.img_size``, which it is cropped to)."""
    d, m = cfg.data, cfg.model
    for key, value in (("data.hflip", d.hflip), ("data.random_erasing", d.random_erasing)):
        if not 0.0 <= value <= 1.0:
            _fail(key, f"is a probability in [0, 1]; got {value}")
    if d.pad < 0:
        _fail("data.pad", f"must be >= 0; got {d.pad}")
    for key, value in (("data.mean", d.mean), ("data.std", d.std)):
        if value is not None and len(value) != 3:
            _fail(key, f"needs 3 values (RGB) or null; got {list(value)}")
    if d.std is not None and min(d.std) <= 0:
        _fail("data.std", "must be positive")
    if d.num_classes is not None and d.num_classes < 2:
        _fail("data.num_classes", f"must be >= 2 or null (one class leaves nothing to tell apart); got {d.num_classes}")
    if d.dataset == "synthetic":
        if not 24 <= d.synthetic_image_size <= 1024:
            _fail("data.synthetic_image_size", f"must be in [24, 1024]; got {d.synthetic_image_size}")
        for key in ("synthetic_train_per_class", "synthetic_test_per_class"):
            if d[key] < 1:
                _fail(f"data.{key}", f"must be >= 1; got {d[key]}")
        size = d.synthetic_num_classes * max(d.synthetic_train_per_class, d.synthetic_test_per_class) * (
            3 * d.synthetic_image_size**2)
        if size > MAX_SYNTHETIC_BYTES:
            _fail("data.synthetic_train_per_class", f"and synthetic_test_per_class, synthetic_num_classes, "
                  f"synthetic_image_size ask for a {size / 2**30:.1f} GiB generated set; at most "
                  f"{MAX_SYNTHETIC_BYTES >> 30} GiB (it is generated in memory)")
    if d.synthetic_seed < 0:
        _fail("data.synthetic_seed", f"must be >= 0; got {d.synthetic_seed}")
    if cfg.task == "fgvc" and d.resize is not None:
        img = [m.img_size] * 2 if isinstance(m.img_size, int) else list(m.img_size)
        rs = [d.resize] * 2 if isinstance(d.resize, int) else list(d.resize)
        if rs[0] < img[0] or rs[1] < img[1]:
            _fail("data.resize", f"({d.resize}) must be >= model.img_size ({m.img_size}): it is cropped to it")
    _check_parts(cfg)


def _check_parts(cfg: DictConfig) -> None:
    """``data.classes`` / ``data.identities`` / ``data.train_splits`` well formed and fitting the task."""
    from dcal.data.subsets import parse_selection

    d = cfg.data
    for key, spec, task in (("data.classes", d.classes, "fgvc"), ("data.identities", d.identities, "reid")):
        if spec is None:
            continue
        if cfg.task != task:
            _fail(key, f"selects {'classes' if task == 'fgvc' else 'identities'} of a {task} data set; "
                       f"data.dataset={d.dataset!r} is {cfg.task}")
        spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        try:
            parse_selection(spec, key)
        except ValueError as e:
            raise ConfigError(f"config key {e}") from None
    splits = list(d.train_splits)
    allowed = ("train", "test") if cfg.task == "fgvc" else ("train",)
    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(allowed):
        _fail("data.train_splits", f"must be distinct splits out of {list(allowed)}; got {splits}")


@dataclass
class LoraConfig:
    """model.lora: LoRA adapters on the backbone blocks' linear layers (dcal.model.finetune; needs dcal[lora])."""

    rank: int = 0  # r; 0 = no LoRA
    alpha: float = 16.0  # the merged weight is W + (alpha / r) B A
    dropout: float = 0.0  # on the adapters' input (training)
    targets: list[str] = field(default_factory=lambda: list(vocab.LORA_TARGETS))  # attention qkv / proj, MLP fc1 / fc2


@dataclass
class ModelConfig:
    backbone: str = "deit_tiny_patch16_224"  # timm model name (optionally with a pretrained tag)
    img_size: Any = 448  # network input: int or [H, W]
    pretrained: bool = False  # load timm's pretrained weights for `backbone`
    pretrained_file: str | None = None  # or from this local file (.pth/.safetensors/.npz) or dcal train run folder
    # a pretraining recipe (YAML): its SA-only run is trained once into a cache folder beside the runs, reused
    # while its config is unchanged, and the backbone fine-tuned from it (dcal.pretrain)
    pretrain: str | None = None
    glca_blocks: int = 1  # M (0 = no GLCA)
    pwca_blocks: int = 12  # T (0 = no PWCA)
    top_r: float | None = None  # R, fraction of patch tokens used as GLCA queries; None = 0.1 fgvc / 0.3 reid
    drop_path_rate: float = 0.1  # stochastic depth
    query_selection: str = "rollout"  # rollout | random | last_layer (ablation)
    pair_strategy: str = "random"  # PWCA distractor: random | intra | inter | mix | noise (Table 4)
    # GLCA feature: mean of the local queries' outputs (docs/design.md, GLCA) | cls (the class token's output, for
    # comparison)
    glca_pool: str = "mean"
    patch_stride: int | None = None  # < patch size: TransReID's overlapping patches (docs/design.md); None = patch size
    # extra timm.create_model arguments, e.g. {depth: 4, embed_dim: 96, num_heads: 3, patch_size: 8} for a
    # small from-scratch ViT (the demo); drop_path_rate and img_size have their own keys
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # parameter-efficient fine-tuning (dcal.model.finetune): the stem and first K backbone blocks frozen (0 = none);
    # LoRA adapters on the other blocks' linear layers (the backbone's weights then frozen); GLCA and heads train
    freeze_blocks: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)


def _check_model(cfg: DictConfig) -> None:
    """:class:`ModelConfig`'s constraints (and :class:`LoraConfig`'s: :func:`_check_finetune`)."""
    m = cfg.model
    check_backbone_name(m.backbone)
    check_timm_kwargs(OmegaConf.to_container(m.timm_kwargs))
    for key, value in (("model.glca_blocks", m.glca_blocks), ("model.pwca_blocks", m.pwca_blocks)):
        if not 0 <= value <= MAX_BLOCKS:
            _fail(key, f"must be in [0, {MAX_BLOCKS}]; got {value}")
    if m.patch_stride is not None and m.patch_stride < 1:
        _fail("model.patch_stride", f"must be >= 1 (at most the patch size) or null; got {m.patch_stride}")
    if not 0.0 < m.top_r <= 1.0:
        _fail("model.top_r", f"is a fraction in (0, 1]; got {m.top_r}")
    if not 0.0 <= m.drop_path_rate < 1.0:
        _fail("model.drop_path_rate", f"must be in [0, 1); got {m.drop_path_rate}")
    depth = m.timm_kwargs.get("depth")
    if isinstance(depth, int) and m.pwca_blocks > depth:
        _fail("model.pwca_blocks", f"({m.pwca_blocks}) must be <= the backbone depth ({depth})")
    _check_finetune(m, depth)
    sources = [k for k, v in (("model.pretrained", m.pretrained), ("model.pretrained_file", m.pretrained_file),
                              ("model.pretrain", m.pretrain)) if v]
    if len(sources) > 1:
        _fail(sources[1], f"and {sources[0]} are exclusive: set one source of backbone weights")


def _check_finetune(m: DictConfig, depth: Any) -> None:
    """``model.freeze_blocks`` and ``model.lora`` in range (the depth of a named backbone is checked when it is
    built: dcal.model.finetune.apply_finetune)."""
    high = depth if isinstance(depth, int) else MAX_BLOCKS
    if not 0 <= m.freeze_blocks <= high:
        what = " (the backbone depth)" if isinstance(depth, int) else ""
        _fail("model.freeze_blocks", f"must be in [0, {high}]{what}; got {m.freeze_blocks}")
    lo = m.lora
    if not 0 <= lo.rank <= MAX_LORA_RANK:
        _fail("model.lora.rank", f"must be in [0, {MAX_LORA_RANK}] (0 = no LoRA); got {lo.rank}")
    if not 0.0 < lo.alpha <= 1e6:
        _fail("model.lora.alpha", f"must be in (0, 1e6]; got {lo.alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        _fail("model.lora.dropout", f"must be in [0, 1); got {lo.dropout}")
    targets = list(lo.targets)
    bad = [t for t in targets if t not in vocab.LORA_TARGETS]
    if bad or not targets or len(set(targets)) != len(targets):
        close = difflib.get_close_matches(str(bad[0]), vocab.LORA_TARGETS, n=1, cutoff=0.5) if bad else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail("model.lora.targets", f"must be distinct names out of {', '.join(vocab.LORA_TARGETS)}, at least one; "
              f"got {targets}{hint}")


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    triplet_margin: float = 0.3  # Re-ID batch-hard triplet margin
    triplet_soft_margin: bool = False
    weighting: str = "dynamic"  # dynamic (learnable uncertainty weights) | fixed
    fixed_weights: list[float] | None = None  # [sa, glca, pwca] when weighting=fixed; None = [1, 1, 1]


def _check_loss(cfg: DictConfig) -> None:
    """:class:`LossConfig`'s constraints."""
    lo = cfg.loss
    if not 0.0 <= lo.label_smoothing < 1.0:
        _fail("loss.label_smoothing", f"must be in [0, 1); got {lo.label_smoothing}")
    if lo.triplet_margin < 0:
        _fail("loss.triplet_margin", f"must be >= 0; got {lo.triplet_margin}")
    if lo.fixed_weights is not None:
        weights = list(lo.fixed_weights)
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            _fail("loss.fixed_weights", f"needs 3 values [sa, glca, pwca], each >= 0, not all 0; got {weights}")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 16  # per process: under torchrun the global batch is batch_size x processes
    lr: float | None = None  # None: fgvc = base_lr * global batch / 512, reid = 0.008
    base_lr: float = 5e-4  # FGVC lr per 512 images
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD
    scheduler: str = "cosine"  # cosine | step | constant
    warmup_epochs: int = 0
    warmup_lr: float = 0.0  # lr at the first warmup step (linear ramp to lr)
    min_lr: float = 0.0  # cosine floor
    step_epochs: list[int] = field(default_factory=list)  # scheduler=step: epochs at which lr *= step_gamma
    step_gamma: float = 0.1
    workers: int = 4
    seed: int = 0
    sampler: str = "auto"  # auto (Re-ID: pk, FGVC: shuffle) | shuffle | pk: P classes x K images (pk_batches)
    num_instances: int = 4  # K images per identity or class in a P x K batch (Re-ID, train.sampler=pk)
    amp: str = "none"  # none | bf16 | fp16
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False
    clip_grad: float | None = None  # max gradient norm; None = no clipping
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50  # iterations
    eval_every: int = 1  # epochs
    save_every: int = 0  # epochs between checkpoints beyond the last/best; 0 = only last and best
    save_every_steps: int = 0  # optimizer steps between mid-epoch checkpoints (last.pth); 0 = end of epoch only
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row (each such step is not applied)
    sync_bn: bool = False  # under torchrun: BatchNorm (Re-ID BNNecks) with global-batch statistics
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact reruns and resumes; slower)
    # resuming is not a key: it is how a run is started (dcal train --resume, fit(cfg, resume=True))


def _check_train(cfg: DictConfig) -> None:
    """:class:`TrainConfig`'s constraints (the batch against the task and PWCA)."""
    t, m = cfg.train, cfg.model
    if t.epochs < 1:
        _fail("train.epochs", f"must be >= 1; got {t.epochs}")
    if t.batch_size < 1:
        _fail("train.batch_size", f"must be >= 1; got {t.batch_size}")
    for key in ("lr", "base_lr", "step_gamma"):
        if t[key] <= 0:
            _fail(f"train.{key}", f"must be > 0; got {t[key]}")
    if t.weight_decay < 0:
        _fail("train.weight_decay", f"must be >= 0; got {t.weight_decay}")
    if t.warmup_epochs < 0:
        _fail("train.warmup_epochs", f"must be >= 0; got {t.warmup_epochs}")
    if any(s < 0 for s in t.step_epochs):
        _fail("train.step_epochs", f"must be epochs >= 0; got {list(t.step_epochs)}")
    if t.workers < 0:
        _fail("train.workers", f"must be >= 0; got {t.workers}")
    if not 0 <= t.seed < 2**31:
        _fail("train.seed", f"must be in [0, 2**31); got {t.seed}")
    if t.clip_grad is not None and t.clip_grad <= 0:
        _fail("train.clip_grad", f"must be > 0 or null; got {t.clip_grad}")
    if cfg.task == "reid" and t.sampler == "shuffle":
        _fail("train.sampler", "shuffle cannot train Re-ID: its triplet loss needs K images of each identity in a "
                               "batch; use auto or pk")
    if pk_batches(cfg) and (t.num_instances < 1 or t.batch_size % t.num_instances):
        _fail(
            "train.num_instances",
            f"({t.num_instances}) must be >= 1 and divide train.batch_size ({t.batch_size}): "
            f"a {'Re-ID' if cfg.task == 'reid' else 'train.sampler=pk'} batch is P "
            f"{'identities' if cfg.task == 'reid' else 'classes'} x K instances",
        )
    for key, value in (("train.log_every", t.log_every), ("train.eval_every", t.eval_every)):
        if value < 1:
            _fail(key, f"must be >= 1; got {value}")
    for key, low in (("save_every", 0), ("save_every_steps", 0), ("max_bad_steps", 1), ("momentum", 0),
                     ("min_lr", 0), ("warmup_lr", 0)):
        if t[key] < low:
            _fail(f"train.{key}", f"must be >= {low}; got {t[key]}")
    if t.batch_size < 2 and m.pwca_blocks > 0:
        _fail("train.batch_size", f"must be >= 2 with PWCA (each image is paired with another); got {t.batch_size}")


@dataclass
class EvalConfig:
    fusion: str = "sa+glca"  # FGVC: softmax(SA)+softmax(GLCA); Re-ID: concat features; or one branch
    reid_feature: str = "before_bn"  # before_bn | after_bn
    flip: bool = False  # Re-ID: average the features of the image and its mirror
    metric: str = "euclidean"  # euclidean (on L2-normalised features) | cosine
    rerank: bool = False  # k-reciprocal re-ranking
    rerank_method: str = "graph"  # graph (sparse neighbour graph, bounded memory) | dense (N x N matrices)
    chunk_size: int | None = None  # Re-ID: distances held at once while evaluating; None = from free memory
    max_rank: int = 50  # CMC curve length
    batch_size: int | None = None  # None = train.batch_size


def _check_eval(cfg: DictConfig) -> None:
    """:class:`EvalConfig`'s constraints (the fusion against the model's branches)."""
    e, m = cfg.eval, cfg.model
    if e.max_rank < 1:
        _fail("eval.max_rank", f"must be >= 1; got {e.max_rank}")
    if e.batch_size is not None and e.batch_size < 1:
        _fail("eval.batch_size", f"must be >= 1 or null; got {e.batch_size}")
    if e.chunk_size is not None and e.chunk_size < 1:
        _fail("eval.chunk_size", f"must be >= 1 or null; got {e.chunk_size}")
    if e.fusion != "sa" and m.glca_blocks == 0:
        _fail("eval.fusion", f"is {e.fusion!r} but model.glca_blocks=0 (no GLCA branch): use 'sa'")


@dataclass
class RunConfig:
    """A whole run: data, model, loss, training, evaluation (the method's own hyper-parameters are
    :class:`dcal.model.DCALConfig`, built from ``model``)."""

    output_dir: str = "runs/dcal"
    task: str | None = None  # derived from data.dataset
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# each section's constraints, in the order validate() checks them (choices and finiteness come first)
SECTION_CHECKS = (_check_data, _check_model, _check_loss, _check_train, _check_eval)


# ----------------------------------------------------------------------------------------------------------
# key and type checking


def _type_name(tp: Any) -> str:
    """Readable name of a field annotation: ``int``, ``float or null``, ``list of int``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_class(tp: Any) -> type | None:
    return tp if dataclasses.is_dataclass(tp) else None


def _close_keys(key: str, valid: list[str]) -> list[str]:
    """Valid keys that ``key`` is probably a typo or an elaboration of (``lr_rate`` -> ``lr``)."""
    related = [k for k in valid if key.startswith(k + "_") or k.startswith(key + "_") or key.endswith("_" + k)]
    similar = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    return list(dict.fromkeys(similar + related))[:3]


# keys that are not config keys, and what to use instead (a saved config that has them: upgrade_saved_config)
REMOVED_KEYS = {"train.resume": "resume a run with fit(cfg, resume=True) (dcal train --resume)"}


def _check_keys(cls: type, values: Any, prefix: str = "") -> None:
    """Unknown keys anywhere in ``values`` (a plain nested dict) -> ConfigError with close matches."""
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"config section {where!r} expects a mapping, got {values!r}")
    fields = _fields(cls)
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in REMOVED_KEYS:
            raise ConfigError(f"config key {dotted!r} does not exist: {REMOVED_KEYS[dotted]}")
        if not isinstance(key, str) or key not in fields:
            close = _close_keys(str(key), list(fields))
            hint = f" (did you mean {', '.join(repr(prefix + c) for c in close)}?)" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {dotted!r}{hint}; valid keys here: {valid}")
        sub = _section_class(fields[key])
        if sub is not None:
            _check_keys(sub, value, dotted + ".")


def _annotation_of(dotted: str) -> Any:
    cls: Any = RunConfig
    tp: Any = None
    for part in dotted.split("."):
        part = part.split("[", 1)[0]
        if cls is None or part not in _fields(cls):
            return None
        tp = _fields(cls)[part]
        cls = _section_class(tp)
    return tp


MAX_YAML_DEPTH = 16  # a dcal config nests 3 levels (section, key, timm_kwargs / lora); lists add one or two
MAX_YAML_BYTES = 1 << 20  # recipes and stored configs are a few kB


class _StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors/aliases (a few nested aliases expand to billions of nodes) and
    duplicate keys (the later one would silently replace a whole earlier section)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(problem="anchors and aliases (&name, *name) are not allowed",
                                       problem_mark=event.start_mark)
        if self.depth >= MAX_YAML_DEPTH:  # the composer recurses per level: a deep [[[...]]] would overflow
            raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                                       problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        self.flatten_mapping(node)  # merge keys (<<) first: SafeLoader does the same before constructing
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if duplicate:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: str) -> dict[str, Any]:
    """A config mapping from YAML ``text`` (a recipe or a config stored in a checkpoint, named ``source`` in
    errors), read with :class:`_StrictYamlLoader`; empty text, a list or a scalar, nesting deeper than
    :data:`MAX_YAML_DEPTH` and text longer than :data:`MAX_YAML_BYTES` are refused in one line."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source} is {len(text):,} characters long: a dcal config is at most {MAX_YAML_BYTES:,}")
    try:
        values = yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source} is not a valid dcal config: {problem}{where}") from None
    if values is None:
        raise ConfigError(f"{source} is empty (no keys, perhaps cut short): expected a mapping of config sections "
                          "(data:, model:, train:, ...); write {} to take every default")
    if not isinstance(values, dict):
        raise ConfigError(f"{source} holds a YAML {type(values).__name__}, expected a mapping of config sections "
                          "(data:, model:, train:, ...)")
    return values


def _refuse_interpolation(values: Any, source: str, prefix: str = "") -> None:
    """OmegaConf would resolve ``${...}`` (``${oc.env:HOME}`` reads the environment) and treat ``???`` as a missing
    value on access: refused in every string of a layer, naming the dotted key."""
    if isinstance(values, dict):
        for key, value in values.items():
            _refuse_interpolation(value, source, f"{prefix}{key}.")
    elif isinstance(values, list | tuple):
        for i, value in enumerate(values):
            _refuse_interpolation(value, source, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(values, str) and ("${" in values or values == "???"):
        raise ConfigError(f"{source}: config key {prefix.rstrip('.')!r} is {values!r}: OmegaConf interpolation "
                          "(${...}) and '???' are not allowed in dcal configs; write the value itself")


def _merge(base: DictConfig, values: dict[str, Any]) -> DictConfig:
    try:
        return OmegaConf.merge(base, values)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        tp = _annotation_of(str(key))
        expected = _type_name(tp) if tp is not None else "another type"
        value = getattr(e, "value", None)
        raise ConfigError(f"config key {key!r} expects {expected}, got {value!r}") from None


# ----------------------------------------------------------------------------------------------------------
# public API


def default_config() -> DictConfig:
    """The defaults (FGVC recipe values, CUB, DeiT-Tiny), not yet derived."""
    return OmegaConf.structured(RunConfig)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> a nested dict, values parsed as YAML/OmegaConf (``[1,2]``, ``null``, ``1e-3``)."""
    merged = OmegaConf.create()
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        try:
            one = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse override {item!r}: {e}") from None
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        merged = OmegaConf.merge(merged, one)
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


RECIPES = Path(__file__).parent / "recipes"  # the packaged recipes (in a checkout: a link to configs/)
RECIPE_SUFFIXES = (".yaml", ".yml")


def recipe_names() -> list[str]:
    """The packaged recipes, as :func:`resolve_recipe` takes them (``fgvc/cub_deit_tiny``), sorted."""
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*")
                  if p.suffix in RECIPE_SUFFIXES)


def resolve_recipe(name: str | Path) -> Path:
    """The YAML file that ``--config``, ``model.pretrain``, ``dcal ablation`` and :func:`load_config` mean by
    ``name``: an existing file as it is (relative to the current folder); otherwise a packaged recipe by its name,
    with or without ``.yaml`` and the checkout's ``configs/`` prefix (``fgvc/cub_deit_tiny``,
    ``configs/fgvc/cub_deit_tiny.yaml``), so that the recipes work from an installed package too."""
    path = Path(name)
    if path.is_file():
        return path
    rel = path.as_posix().removeprefix("./").removeprefix("configs/")
    packaged = RECIPES / (rel if path.suffix in RECIPE_SUFFIXES else rel + ".yaml")
    if packaged.is_file():
        return packaged
    close = difflib.get_close_matches(rel.removesuffix(path.suffix) if path.suffix in RECIPE_SUFFIXES else rel,
                                      recipe_names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " ('dcal recipes' lists the packaged ones)"
    raise ConfigError(f"config file not found: {name}: neither a file nor a packaged recipe{hint}")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> DictConfig:
    """Defaults <- YAML file ``path`` (a file or a packaged recipe's name: :func:`resolve_recipe`) <- ``values``
    (an already parsed mapping, e.g. the config stored in a checkpoint) <- ``key=value`` overrides, then derived
    and validated. A relative ``data.root`` stays relative: it is read from the current folder, not the recipe's.

    Raises:
        ConfigError: unknown key, wrong type, value out of its choices or range (message names the key).
    """
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = resolve_recipe(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} could not be read: {e}") from None
        layers.append((f"config file {path}", read_yaml(text, f"config file {path}")))
    layers.append(("the stored config", values))
    if overrides:
        layers.append(("the overrides", parse_overrides(list(overrides))))
    cfg = default_config()
    for source, layer in layers:
        if layer is not None:
            _check_keys(RunConfig, layer)
            _refuse_interpolation(layer, source)
            cfg = _merge(cfg, layer)
    derive(cfg)
    validate(cfg)
    return cfg


def _size(value: Any, key: str, allow_none: bool) -> int | list[int] | None:
    """Check an ``int or [H, W]`` value; returns it as an int or a plain list."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"config key {key!r} expects int or [H, W], got None")

    def side(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_IMG_SIDE

    if OmegaConf.is_list(value) or isinstance(value, list | tuple):
        items = list(value)
        if len(items) == 2 and all(side(v) for v in items):
            return items
    elif side(value):
        return value
    raise ConfigError(f"config key {key!r} expects an int in [1, {MAX_IMG_SIDE}] or [H, W] of them, got {value!r}")


def derive(cfg: DictConfig) -> DictConfig:
    """Fill the derived values in place (task, top_r, lr) and check the size fields."""
    from dcal.data import task_of

    try:
        task = task_of(cfg.data.dataset)
    except ValueError as e:
        raise ConfigError(f"config key 'data.dataset': {e}") from None
    if cfg.task is not None and cfg.task != task:
        raise ConfigError(
            f"config key 'task' is {cfg.task!r} but data.dataset={cfg.data.dataset!r} is a {task} dataset "
            f"(task is derived: leave it out)"
        )
    cfg.task = task
    if cfg.model.top_r is None:
        cfg.model.top_r = vocab.DEFAULT_TOP_R[task]
    if cfg.train.lr is None:
        if task == "fgvc":
            from dcal.distributed import env_world_size

            global_batch = cfg.train.batch_size * env_world_size()
            cfg.train.lr = cfg.train.base_lr * global_batch / FGVC_LR_REFERENCE_BATCH
        else:
            cfg.train.lr = REID_DEFAULT_LR
    cfg.model.img_size = _size(cfg.model.img_size, "model.img_size", allow_none=False)
    cfg.data.resize = _size(cfg.data.resize, "data.resize", allow_none=True)
    return cfg


def pk_batches(cfg: DictConfig) -> bool:
    """Whether training draws P x K batches (P classes or identities, K = ``train.num_instances`` images each):
    always for Re-ID, for FGVC with ``train.sampler=pk`` (every image then has K-1 same-class partners in its
    batch, what ``model.pair_strategy=intra`` needs)."""
    return cfg.train.sampler == "pk" or (cfg.train.sampler == "auto" and cfg.task == "reid")


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key {key!r} {msg}")


def _float_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every float field (``float``, ``float or null``, ``list of float``)."""
    keys = []
    for name, tp in _fields(cls).items():
        sub = _section_class(tp)
        if sub is not None:
            keys += _float_keys(sub, f"{prefix}{name}.")
        elif float in (tp, *typing.get_args(tp)) or list[float] in typing.get_args(tp):
            keys.append(prefix + name)
    return keys


def check_backbone_name(name: Any, key: str = "model.backbone") -> None:
    """A timm model name (optionally ``.tag``), nothing timm would resolve through a hub, a folder or a file."""
    if not isinstance(name, str) or not BACKBONE_NAME.fullmatch(name):
        _fail(key, f"must be a timm model name, optionally with a pretrained tag (e.g. "
                   f"'vit_base_patch16_224.augreg_in21k'): lowercase letters, digits, '_' and one '.'; no 'hf-hub:', "
                   f"'local-dir:' or path; got {name!r}")


def check_timm_kwargs(kwargs: Any, key: str = "model.timm_kwargs") -> None:
    """``kwargs`` holds only :data:`TIMM_KWARGS` keys, each of its type and in its range."""
    if not isinstance(kwargs, dict):
        _fail(key, f"expects a mapping of timm architecture arguments, got {kwargs!r}")
    allowed = ", ".join(TIMM_KWARGS)
    for name, value in kwargs.items():
        dotted = f"{key}.{name}"
        if name in OWN_KEYS:
            _fail(dotted, f"is not allowed: use {OWN_KEYS[name]}")
        if name not in TIMM_KWARGS:
            close = _close_keys(str(name), list(TIMM_KWARGS))
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            _fail(dotted, f"is not an allowed timm argument{hint}; allowed: {allowed}")
        kind, low, high, nullable = TIMM_KWARGS[name]
        if value is None and nullable:
            continue
        null = " or null" if nullable else ""
        if kind is bool:
            if not isinstance(value, bool):
                _fail(dotted, f"expects true or false{null}, got {value!r}")
            continue
        if kind is str:
            if value not in TIMM_STRING_CHOICES[name]:
                _fail(dotted, f"must be one of {list(TIMM_STRING_CHOICES[name])}{null}, got {value!r}")
            continue
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)) or not numeric:
            _fail(dotted, f"expects {kind.__name__}{null}, got {value!r}")
        if not (math.isfinite(value) and low <= value <= high):
            _fail(dotted, f"must be in [{low}, {high}]{null}; got {value!r}")
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        _fail(f"{key}.embed_dim", f"({dim}) must be divisible by num_heads ({heads})")


def validate(cfg: DictConfig) -> None:
    """Check choices, finiteness and ranges of a derived config: the choices (:data:`CHOICES`), then each
    section's constraints, written beside its fields (:data:`SECTION_CHECKS`)."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(key, f"must be one of {', '.join(choices)}; got {value!r}{hint}")
    # NaN passes every `x <= 0` check below, inf most of them; base_lr first: a derived train.lr comes from it
    for key in sorted(_float_keys(), key=lambda k: k != "train.base_lr"):
        value = OmegaConf.select(cfg, key)
        items = [] if value is None else list(value) if OmegaConf.is_list(value) else [value]
        if not all(math.isfinite(v) for v in items):
            _fail(key, f"must be finite; got {items if OmegaConf.is_list(value) else value}")
    for check in SECTION_CHECKS:
        check(cfg)


def upgrade_saved_config(values: dict[str, Any]) -> dict[str, Any]:
    """A config read back from a run folder or a model file, without ``train.resume``: every config was written
    with it until it stopped being a key (it said how that run was started, not what it trains)."""
    train = values.get("train")
    if isinstance(train, dict) and "resume" in train:
        values = {**values, "train": {k: v for k, v in train.items() if k != "resume"}}
    return values


WEIGHT_SOURCES = ("pretrained", "pretrained_file", "pretrain")  # model keys that would load or train a backbone


def load_saved_config(text: str, source: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config stored in a checkpoint (YAML ``text`` from file ``source``) with ``overrides``, for rebuilding
    its model: read and checked like a recipe; its ``model.pretrained`` / ``model.pretrained_file`` /
    ``model.pretrain`` are never acted on (the weights come from the checkpoint, so a checkpoint cannot make dcal
    download, read or train anything else). Errors name ``source``."""
    try:
        values = upgrade_saved_config(read_yaml(text, "its stored config"))
        model = values.get("model")
        if isinstance(model, dict):
            values = {**values, "model": {k: v for k, v in model.items() if k not in WEIGHT_SOURCES}}
        cfg = load_config(None, overrides, values=values)
    except ConfigError as e:
        raise ConfigError(f"checkpoint {source!r}: {e}") from None
    # an override cannot turn them back on either
    cfg.model.pretrained, cfg.model.pretrained_file, cfg.model.pretrain = False, None, None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML text (derived values included)."""
    return OmegaConf.to_yaml(cfg)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write :func:`to_yaml` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# dcal config as run (derived values filled in: task, model.top_r, train.lr;\n"
        "# FGVC train.lr = train.base_lr * train.batch_size / 512)\n"
    )
    path.write_text(header + to_yaml(cfg), encoding="utf-8")
    return path


def dataset_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The options ``dcal.data.build_dataset`` takes for ``cfg.data.dataset``, from the ``data.*`` keys its
    registration names."""
    from dcal.data.registry import dataset_entry

    options = dataset_entry(cfg.data.dataset).options
    return {option: cfg.data[key] for option, key in options.items() if key is not None}
