"""Losses against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dcal.losses import DCALLoss, batch_hard_triplet, param_groups
from tests.helpers import tiny_model


def ref_triplet(f, y, margin, soft):
    terms = []
    for i in range(len(y)):
        pos = [torch.dist(f[i], f[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [torch.dist(f[i], f[j]) for j in range(len(y)) if y[j] != y[i]]
        if pos and neg:
            d = max(pos) - min(neg)
            terms.append(F.softplus(d) if soft else torch.clamp(d + margin, min=0))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_triplet_matches_loop_reference(soft):
    f = torch.randn(12, 8)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])  # id 4 has no positive: left out
    torch.testing.assert_close(batch_hard_triplet(f, y, 0.3, soft), ref_triplet(f, y, 0.3, soft))


def test_uncertainty_weighting_formula_and_fixed_weights():
    logits = {b: torch.randn(6, 4) for b in ("sa", "glca", "pwca")}
    y = torch.randint(0, 4, (6,))
    out = {"logits": logits}
    crit = DCALLoss("fgvc")
    with torch.no_grad():
        for b, w in zip(("sa", "glca", "pwca"), (0.3, -0.2, 1.0), strict=True):
            crit.log_vars[b].fill_(w)
    res = crit(out, y)
    ce = {b: F.cross_entropy(logits[b], y) for b in logits}
    expected = sum(0.5 * (math.exp(-w) * ce[b] + w) for b, w in zip(ce, (0.3, -0.2, 1.0), strict=True))
    torch.testing.assert_close(res.total, expected)
    torch.testing.assert_close(res.per_branch["glca"], ce["glca"])
    assert res.weights["sa"] == pytest.approx(0.5 * math.exp(-0.3))
    fixed = DCALLoss("fgvc", fixed_weights=[1.0, 0.5, 0.25])
    assert not list(fixed.parameters())
    torch.testing.assert_close(fixed(out, y).total, ce["sa"] + 0.5 * ce["glca"] + 0.25 * ce["pwca"])


def test_reid_loss_is_ce_on_bnneck_logits_plus_triplet_on_features():
    f = torch.randn(8, 5)
    logits = torch.randn(8, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    out = {"logits": {"sa": logits}, "features": {"sa": f}}
    crit = DCALLoss("reid", branches=("sa",), label_smoothing=0.1)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1) + ref_triplet(f, y, 0.3, False)
    torch.testing.assert_close(crit(out, y).per_branch["sa"], expected)


def test_missing_branch_and_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="lacks branches"):
        DCALLoss("fgvc")({"logits": {"sa": torch.randn(2, 3)}}, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one weight per branch"):
        DCALLoss("fgvc", fixed_weights=[1.0])
    with pytest.raises(ValueError, match="task"):
        DCALLoss("detection")


def test_param_groups_exclude_norms_biases_tokens_from_decay():
    model = tiny_model()
    crit = DCALLoss("fgvc", model.branches)
    groups = {g["name"]: g for g in param_groups(model, crit, 0.05)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.cls_token) in no_decay
    assert id(model.backbone.blocks[0].norm1.weight) in no_decay
    assert id(model.backbone.blocks[0].attn.qkv.weight) in {id(p) for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["loss_weights"]["weight_decay"] == 0.0


def test_the_loss_counts_the_same_class_pwca_pairs():
    """What the epoch's ``pwca_same_class`` record is built from: images whose distractor has their target."""
    targets = torch.tensor([0, 0, 1, 2])
    logits = {b: torch.zeros(4, 3) for b in ("sa", "pwca")}
    loss = DCALLoss("fgvc", ("sa", "pwca"))
    assert loss({"logits": logits, "pairs": torch.tensor([1, 0, 3, 2])}, targets).same_class_pairs == 2
    assert loss({"logits": logits, "pairs": torch.tensor([2, 3, 0, 1])}, targets).same_class_pairs == 0
    assert loss({"logits": logits, "pairs": None}, targets).same_class_pairs is None  # noise keys/values
    assert DCALLoss("fgvc", ("sa",))({"logits": {"sa": logits["sa"]}}, targets).same_class_pairs is None  # no PWCA
