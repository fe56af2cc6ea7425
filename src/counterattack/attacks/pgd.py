"""Projected gradient descent under an L-inf budget (Madry et al., ICLR 2018), and CW through it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..classifier import ZeroShotClassifier, check_pixels
from ..randomness import ImageRandomness
from .loop import project, run_steps
from .losses import ATTACK_NAMES, LOSSES


@dataclass(frozen=True)
class PGD:
    """L-inf PGD on a loss of the zero-shot logits: cross-entropy (``pgd``) or CW's margin (``cw``).

    Uniform random start in [-eps, eps], ``steps`` signed-gradient ascent steps of ``step_size``,
    each projected onto the eps ball and the [0, 1] box. Budgets are in pixel units ([0, 1]); the
    paper's protocol is eps 1/255, 10 steps, step 1/255; its CW is this loop on the margin loss
    ``-relu(z_true - max_{j != true} z_j + 50)``.

    Example::

        adv = PGD(eps=1 / 255, steps=10, step_size=1 / 255)(classifier, images, labels, rng)
    """

    eps: float = 1 / 255
    steps: int = 10
    step_size: float = 1 / 255
    loss: str = "ce"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; one of {sorted(LOSSES)}")

    @property
    def name(self) -> str:
        return ATTACK_NAMES[self.loss]

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor:
        images = check_pixels(images).detach().float()
        delta = project(images, rng.uniform_like(images, -self.eps, self.eps), self.eps)
        loss_of_logits = LOSSES[self.loss]

        def loss(adv: torch.Tensor) -> torch.Tensor:
            return loss_of_logits(classifier.logits(adv), labels).sum()

        return images + run_steps(loss, images, delta, self.eps, self.step_size, self.steps)

    def describe(self) -> dict:
        return {"attack": self.name, "loss": self.loss, "eps": self.eps, "steps": self.steps, "step_size": self.step_size}
