"""Hedge Defense (Wu, Yang, Wang, Wang, Liu; ICML 2021): "attacking adversarial attacks as a defense".

Signed-gradient steps that *increase* the sum of the cross-entropy losses over all classes, which
pushes a (typically adversarial) image towards a region where the true class wins again.

Choices (the TTC paper gives TTC's budget): start at delta = 0, ``steps`` steps of ``step_size``
projected onto the L-inf ball ``eps`` and the [0, 1] box; defaults 4/255, 2 steps of 1/255. Cost:
``steps`` forwards and backwards plus one final forward per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..classifier import ZeroShotClassifier
from .base import register_defense
from .sign_steps import SignStepDefense


def summed_class_losses(logits: torch.Tensor) -> torch.Tensor:
    """``sum_images sum_classes CE(logits, c)`` = ``-sum log_softmax``."""
    return -torch.log_softmax(logits, dim=-1).sum()


@register_defense
@dataclass(frozen=True)
class HedgeDefense(SignStepDefense):
    """Hedge Defense, Wu et al., ICML 2021: signed steps from x that increase the summed loss of every class."""

    def objective(self, classifier: ZeroShotClassifier, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda moved: summed_class_losses(classifier.logits(moved))
