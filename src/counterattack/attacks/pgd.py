"""Projected gradient descent under an L-inf budget (Madry et al., ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..classifier import ZeroShotClassifier
from ..randomness import ImageRandomness
from .loop import project, sign_gradient_steps


@dataclass(frozen=True)
class PGD:
    """L-inf PGD on the cross-entropy of the zero-shot logits.

    Uniform random start in [-eps, eps], ``steps`` signed-gradient ascent steps of ``step_size``,
    each projected onto the eps ball and the [0, 1] box. Budgets are in pixel units ([0, 1]); the
    paper's protocol is eps 1/255, 10 steps, step 1/255.

    Example::

        adv = PGD(eps=1 / 255, steps=10, step_size=1 / 255)(classifier, images, labels, rng)
    """

    eps: float = 1 / 255
    steps: int = 10
    step_size: float = 1 / 255
    name: str = "pgd"

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor:
        images = images.detach().float()
        delta = project(images, rng.uniform_like(images, -self.eps, self.eps), self.eps)

        def loss(adv: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(classifier.logits(adv), labels, reduction="sum")

        for delta in sign_gradient_steps(loss, images, delta, self.eps, self.step_size, self.steps):
            pass
        return (images + delta).detach()

    def describe(self) -> dict:
        return {"attack": self.name, "eps": self.eps, "steps": self.steps, "step_size": self.step_size}
