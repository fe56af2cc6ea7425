"""Losses an attack ascends, per image (attacks sum them over the batch)."""

from __future__ import annotations

from collections.abc import Callable

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


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": cross_entropy, "cw": cw_margin}

# The name an attack goes by with each loss (the paper calls PGD on the margin loss "CW").
ATTACK_NAMES: dict[str, str] = {"ce": "pgd", "cw": "cw"}
