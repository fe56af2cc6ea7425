"""Defenses that take signed-gradient steps from the image itself (Anti-Adversary, Hedge Defense)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attacks.loop import replay_steps, run_steps
from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..randomness import ImageRandomness
from .base import (
    PIXEL_UNIT, TTC_EPS, TTC_STEP_SIZE, TTC_STEPS, AttackView, DefenseOutput, option,
    through_defense,
)


@dataclass(frozen=True)
class SignStepDefense:
    """``steps`` ascent steps of ``step_size`` on ``objective`` from delta = 0, within ``eps`` and [0, 1].

    Cost: ``steps`` forwards and backwards plus one final forward per image.
    """

    eps: float = option(TTC_EPS, "budget of the steps", unit=PIXEL_UNIT)
    steps: int = option(TTC_STEPS, "signed-gradient steps")
    step_size: float = option(TTC_STEP_SIZE, "size of each step", unit=PIXEL_UNIT)

    def objective(self, classifier: ZeroShotClassifier, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The scalar to ascend, as a function of the moved images (summed over the batch)."""
        raise NotImplementedError

    @torch.no_grad()
    def perturbation(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, signs: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        return run_steps(
            self.objective(classifier, images), images, torch.zeros_like(images), self.eps, self.step_size, self.steps,
            signs,
        )

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = check_pixels(images).detach().float()
        defended = x + self.perturbation(classifier, x)
        return DefenseOutput(classifier.logits(defended), images=defended)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        signs: list[torch.Tensor] = []
        self.perturbation(classifier, check_pixels(images).detach().float(), signs)
        start = torch.zeros_like(images)
        delta = replay_steps(images, start, signs, self.step_size, self.eps)[-1] if signs else start
        return AttackView(classifier.logits(through_defense(images, delta, method)))
