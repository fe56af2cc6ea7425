"""No defense: the plain zero-shot classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..classifier import ZeroShotClassifier, check_pixels
from ..randomness import ImageRandomness
from .base import AttackView, DefenseOptions, DefenseOutput


@dataclass(frozen=True)
class NoDefense:
    name: str = "none"

    @classmethod
    def from_options(cls, options: DefenseOptions) -> "NoDefense":
        return cls()

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        return DefenseOutput(logits=classifier.logits(check_pixels(images)), images=images)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str, with_tau: bool = False
    ) -> AttackView:
        return AttackView(classifier.logits(check_pixels(images)))

    def describe(self) -> dict:
        return {"defense": self.name}
