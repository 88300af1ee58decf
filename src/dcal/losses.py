"""DCAL losses: per-branch losses combined with learnable uncertainty weights (docs/design.md, Heads and losses).

FGVC: cross-entropy per branch. Re-ID: cross-entropy on the BNNeck logits + batch-hard triplet on the feature
before BN, per branch. PWCA's target is SA's (the distractor is only noise for the attention).

Dynamic weights (Kendall et al. 2018, as FairMOT uses them): total = Σ_b 0.5·(exp(−w_b)·L_b + w_b) with w_b
learnable scalars initialised at 0. They must be in the optimizer, without weight decay: use
:func:`param_groups`. The total can be negative; that is expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcal.vocabulary import BRANCHES, TASKS


def batch_hard_triplet(features: Tensor, targets: Tensor, margin: float = 0.3, soft_margin: bool = False) -> Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances between raw features.

    For each anchor: hardest positive (farthest same-id) and hardest negative (closest other-id);
    loss = mean(max(0, d_ap − d_an + margin)), or mean(softplus(d_ap − d_an)) with ``soft_margin``.
    Anchors without a positive or a negative in the batch are left out.
    """
    dist = torch.cdist(features, features).clamp_min(1e-12)
    same = targets[:, None] == targets[None, :]
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not bool(valid.any()):
        return features.sum() * 0.0  # no triplet in this batch: zero loss that keeps the graph
    d_ap = dist.masked_fill(~pos_mask, float("-inf")).amax(dim=1)[valid]
    d_an = dist.masked_fill(~neg_mask, float("inf")).amin(dim=1)[valid]
    if soft_margin:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


@dataclass
class LossOutput:
    total: Tensor
    per_branch: dict[str, Tensor]  # unweighted loss of each branch
    weights: dict[str, float]  # effective weight of each branch: 0.5·exp(−w_b) (dynamic) or λ_b (fixed)
    sa_correct: int = 0  # training images whose SA logits rank the target first (the epoch's train top-1)
    same_class_pairs: int | None = None  # images whose PWCA distractor is of their own class (None: no distractor)


class DCALLoss(nn.Module):
    """Sum of the branches' losses under learnable uncertainty weights (or fixed ones for ablations).

    Args:
        task: ``fgvc`` or ``reid``.
        branches: branches that produce a loss (``model.branches``); each gets one weight.
        label_smoothing: cross-entropy label smoothing (default off, as the paper).
        triplet_margin: margin of the batch-hard triplet loss (Re-ID).
        soft_margin: soft-margin triplet instead of a hard margin (Re-ID).
        fixed_weights: per-branch weights λ_b (total = Σ λ_b L_b) instead of the learnable ones.
    """

    def __init__(
        self,
        task: str = "fgvc",
        branches: Sequence[str] = BRANCHES,
        label_smoothing: float = 0.0,
        triplet_margin: float = 0.3,
        soft_margin: bool = False,
        fixed_weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be 'fgvc' or 'reid', got {task!r}")
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {list(branches)}")
        self.task = task
        self.branches = tuple(branches)
        self.label_smoothing = label_smoothing
        self.triplet_margin = triplet_margin
        self.soft_margin = soft_margin
        if fixed_weights is None:
            self.log_vars = nn.ParameterDict({b: nn.Parameter(torch.zeros(())) for b in self.branches})
            self.fixed = None
        else:
            if not isinstance(fixed_weights, Mapping):
                if len(fixed_weights) != len(self.branches):
                    raise ValueError(
                        f"fixed_weights needs one weight per branch {self.branches}, got {list(fixed_weights)}"
                    )
                fixed_weights = dict(zip(self.branches, fixed_weights, strict=True))
            missing = [b for b in self.branches if b not in fixed_weights]
            if missing:
                raise ValueError(f"fixed_weights lacks branches {missing}")
            self.log_vars = nn.ParameterDict()
            self.fixed = {b: float(fixed_weights[b]) for b in self.branches}

    def branch_loss(self, out: Mapping, branch: str, targets: Tensor) -> Tensor:
        loss = F.cross_entropy(out["logits"][branch], targets, label_smoothing=self.label_smoothing)
        if self.task == "reid":
            loss = loss + batch_hard_triplet(out["features"][branch], targets, self.triplet_margin, self.soft_margin)
        return loss

    def forward(self, out: Mapping, targets: Tensor) -> LossOutput:
        missing = [b for b in self.branches if b not in out["logits"]]
        if missing:
            raise ValueError(
                f"model output lacks branches {missing} (PWCA runs in train mode only; "
                f"build the loss with branches=model.branches)"
            )
        per_branch = {b: self.branch_loss(out, b, targets) for b in self.branches}
        if self.fixed is not None:
            total = sum(self.fixed[b] * per_branch[b] for b in self.branches)
            weights = dict(self.fixed)
        else:
            total = sum(0.5 * (torch.exp(-self.log_vars[b]) * per_branch[b] + self.log_vars[b]) for b in self.branches)
            weights = {b: 0.5 * float(torch.exp(-self.log_vars[b].detach())) for b in self.branches}
        correct = int((out["logits"]["sa"].detach().argmax(-1) == targets).sum())
        pairs = out.get("pairs")
        same = None if pairs is None else int((targets[pairs] == targets).sum())
        return LossOutput(total=total, per_branch=per_branch, weights=weights, sa_correct=correct,
                          same_class_pairs=same)


def param_groups(
    model: nn.Module, criterion: nn.Module | None = None, weight_decay: float = 0.05
) -> list[dict[str, object]]:
    """Optimizer parameter groups: weight decay on weight matrices only; none on biases, norms, position
    embeddings, class token (timm's ``no_weight_decay``) and the loss weights, which must be optimised too."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    loss_params: Iterable[nn.Parameter] = [] if criterion is None else [p for p in criterion.parameters()]
    loss_params = [p for p in loss_params if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0, "name": "loss_weights"})
    return [g for g in groups if g["params"]]
