"""Projected gradient descent under an L-inf budget on the cross-entropy (Madry et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..options import PIXEL_UNIT, option
from ..randomness import ImageRandomness
from .base import register_attack
from .loop import project, run_steps
from .losses import cross_entropy


@register_attack
@dataclass(frozen=True)
class PGD:
    """L-inf PGD on the cross-entropy (the paper's PGD-10).

    Uniform random start in [-eps, eps], ``steps`` signed-gradient ascent steps of ``step_size``,
    each projected onto the eps ball and the [0, 1] box. Budgets are in pixel units ([0, 1]); the
    paper's protocol is eps 1/255, 10 steps, step 1/255. Subclasses change the ``loss`` (``CW``).

    Example::

        adv = PGD(eps=1 / 255, steps=10, step_size=1 / 255)(classifier, images, labels, rng)
    """

    eps: float = option(1 / 255, "L-inf budget", unit=PIXEL_UNIT)
    steps: int = option(10, "iterations")
    step_size: float = option(1 / 255, "size of each signed-gradient step", unit=PIXEL_UNIT)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image, what the attack ascends."""
        return cross_entropy(logits, labels)

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor:
        images = check_pixels(images).detach().float()
        delta = project(images, rng.uniform_like(images, -self.eps, self.eps), self.eps)

        def loss(adv: torch.Tensor) -> torch.Tensor:
            return self.loss(classifier.logits(adv), labels).sum()

        return images + run_steps(loss, images, delta, self.eps, self.step_size, self.steps)
