"""Random noise (RN): TTC's ``delta0`` alone, with no gradient steps and no gate.

The baseline that isolates TTC's counterattack: the same uniform noise in the eps_ttc ball (4/255
by default) drawn from the same per-image stream, so RN equals TTC whenever TTC judges every image
clean (at equal eps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attacks.loop import project
from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..randomness import ImageRandomness
from .base import (
    PIXEL_UNIT, TTC_EPS, AttackView, DefenseOutput, option, register_defense,
    through_defense,
)


@register_defense
@dataclass(frozen=True)
class RandomNoise:
    """TTC's uniform noise delta0 alone: no steps, no gate (1 forward per image)."""

    eps: float = option(TTC_EPS, "noise budget (uniform in [-eps, eps])", unit=PIXEL_UNIT)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = check_pixels(images).detach().float()
        delta0 = project(x, rng.uniform_like(x, -self.eps, self.eps), self.eps)
        return DefenseOutput(logits=classifier.logits(x + delta0), images=x + delta0)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        delta0 = project(check_pixels(images), rng.uniform_like(images, -self.eps, self.eps), self.eps)
        return AttackView(classifier.logits(through_defense(images, delta0, method)))
