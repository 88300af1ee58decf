"""DCAL model: streams (SA, GLCA, PWCA), rollout, pairing, heads, complexity."""

from dcal.model.dcal import DCAL, DCALConfig, create_model, load_pretrained_file, model_config
from dcal.model.finetune import LoraSettings, apply_finetune, merge_lora
from dcal.model.pairs import random_derangement, sample_pairs
from dcal.model.rollout import num_local_queries, rollout_cls_row, select_top

__all__ = [
    "DCAL",
    "DCALConfig",
    "LoraSettings",
    "apply_finetune",
    "create_model",
    "load_pretrained_file",
    "merge_lora",
    "model_config",
    "num_local_queries",
    "random_derangement",
    "rollout_cls_row",
    "sample_pairs",
    "select_top",
]
