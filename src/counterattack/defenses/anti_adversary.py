"""Anti-Adversary (Alfarra, Pérez, Thabet, Bibi, Torr, Ghanem; AAAI 2022).

Classify x, then take signed-gradient steps that *decrease* the cross-entropy of that predicted
class, moving the image away from the decision boundary, and classify the result.

Choices (the TTC paper gives none beyond using TTC's budget): start at delta = 0, ``steps`` steps of
``step_size`` projected onto the L-inf ball ``eps`` and the [0, 1] box; defaults are TTC's, 4/255,
2 steps of 1/255. The first step's forward at x also gives the prediction, so the cost is
``steps`` forwards and backwards plus one final forward per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..classifier import ZeroShotClassifier
from .base import register_defense
from .sign_steps import SignStepDefense


@register_defense
@dataclass(frozen=True)
class AntiAdversary(SignStepDefense):
    """Alfarra et al., AAAI 2022: signed steps from x that decrease the loss of the predicted class."""

    def objective(self, classifier: ZeroShotClassifier, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        predicted: list[torch.Tensor] = []

        def confidence_of_prediction(moved: torch.Tensor) -> torch.Tensor:
            logits = classifier.logits(moved)
            if not predicted:  # the first forward is at x itself
                predicted.append(logits.argmax(-1).detach())
            return -F.cross_entropy(logits, predicted[0], reduction="sum")

        return confidence_of_prediction
