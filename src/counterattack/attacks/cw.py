"""The TTC paper's CW: the PGD loop on Carlini and Wagner's margin loss (S&P 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from .base import register_attack
from .losses import CW_KAPPA, cw_margin
from .pgd import PGD


@register_attack
@dataclass(frozen=True)
class CW(PGD):
    """L-inf PGD on Carlini-Wagner's margin loss (the paper's CW-10).

    The loss is ``-relu(z_true - max_{j != true} z_j + kappa)``, the loop, start and budget PGD's.
    """

    kappa: float = option(CW_KAPPA, "confidence margin of the loss")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cw_margin(logits, labels, self.kappa)
