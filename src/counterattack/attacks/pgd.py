"""Projected gradient descent under an L-inf budget on the cross-entropy (Madry et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..options import PIXEL_UNIT, option
from ..randomness import ImageRandomness
from .base import register_attack
from .loop import gradient_steps, last_of, project, sign_step
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

    norm: ClassVar[str] = "linf"
    eps: float = option(1 / 255, "L-inf budget", unit=PIXEL_UNIT)
    steps: int = option(10, "iterations")
    step_size: float = option(1 / 255, "size of each signed-gradient step", unit=PIXEL_UNIT)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image, what the attack ascends."""
        return cross_entropy(logits, labels)

    def step(self, images: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """A signed-gradient step of ``step_size``, projected onto the L-inf ball and the box."""
        return sign_step(images, delta, grad, self.step_size, self.eps)

    def project(self, images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return project(images, delta, self.eps)

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adversarial images, from a uniform random start in the ball, or from ``start`` (adversarial images of
        these images: an earlier attack's, to go on from)."""
        images = check_pixels(images).detach().float()
        initial = rng.uniform_like(images, -self.eps, self.eps) if start is None else start.detach().float() - images
        delta = self.project(images, initial)

        def loss(adv: torch.Tensor) -> torch.Tensor:
            return self.loss(classifier.logits(adv), labels).sum()

        return images + last_of(gradient_steps(loss, images, delta, self.steps, self.step), delta)
