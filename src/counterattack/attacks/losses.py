"""Losses an attack ascends, per image (attacks sum them over the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CW_KAPPA = 50.0


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float = CW_KAPPA) -> torch.Tensor:
    """Carlini-Wagner's margin as the TTC paper uses it: ``-relu(z_true - max_{j != true} z_j + kappa)``."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return -F.relu(true - others + kappa)

