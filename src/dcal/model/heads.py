"""Re-ID BNNeck head (Luo et al. 2019, as in TransReID): feature → BatchNorm1d (frozen bias) → linear classifier."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BNNeck(nn.Module):
    """BatchNorm1d with a frozen zero bias followed by a bias-free linear classifier.

    The triplet loss sees the feature before BN, the cross-entropy the logits of the BN output.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feature: Tensor, update_stats: bool = True) -> tuple[Tensor, Tensor]:
        """Returns (BN output, logits). ``update_stats=False`` normalises with batch statistics in training
        without touching the running statistics (used by the PWCA stream, which shares this neck with SA but
        must not shift the statistics that evaluation uses for SA features)."""
        if self.training and not update_stats:
            bn_feature = F.batch_norm(feature, None, None, self.bn.weight, self.bn.bias, True, 0.0, self.bn.eps)
        else:
            bn_feature = self.bn(feature)
        return bn_feature, self.classifier(bn_feature)
