"""No defense: the plain zero-shot classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..randomness import ImageRandomness
from .base import AttackView, DefenseOutput, register_defense


@register_defense
@dataclass(frozen=True)
class NoDefense:
    """The plain zero-shot classifier (1 forward per image)."""

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        return DefenseOutput(logits=classifier.logits(check_pixels(images)), images=images)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        return AttackView(classifier.logits(check_pixels(images)))
