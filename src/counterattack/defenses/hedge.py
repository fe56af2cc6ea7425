"""Hedge Defense (Wu, Yang, Wang, Wang, Liu; ICML 2021): "attacking adversarial attacks as a defense".

Signed-gradient steps that *increase* the sum of the cross-entropy losses over all classes, which
pushes a (typically adversarial) image towards a region where the true class wins again.

Choices (the TTC paper gives TTC's budget): start at delta = 0, ``steps`` steps of ``step_size``
projected onto the L-inf ball ``eps`` and the [0, 1] box; defaults 4/255, 2 steps of 1/255. Cost:
``steps`` forwards and backwards plus one final forward per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attacks.loop import sign_gradient_steps
from ..classifier import ZeroShotClassifier
from ..randomness import ImageRandomness
from .base import DefenseOptions, DefenseOutput


def summed_class_losses(logits: torch.Tensor) -> torch.Tensor:
    """``sum_images sum_classes CE(logits, c)`` = ``-sum log_softmax``."""
    return -torch.log_softmax(logits, dim=-1).sum()


@dataclass(frozen=True)
class HedgeDefense:
    eps: float = 4 / 255
    steps: int = 2
    step_size: float = 1 / 255
    name: str = "hd"

    @classmethod
    def from_options(cls, options: DefenseOptions) -> "HedgeDefense":
        return cls(options.eps, options.steps, options.step_size)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = images.detach().float()
        delta = torch.zeros_like(x)
        loss = lambda moved: summed_class_losses(classifier.logits(moved))  # noqa: E731
        for delta in sign_gradient_steps(loss, x, delta, self.eps, self.step_size, self.steps):
            pass
        n = len(x)
        return DefenseOutput(classifier.logits(x + delta), forwards=(self.steps + 1) * n, backwards=self.steps * n, images=x + delta)

    def describe(self) -> dict:
        return {"defense": self.name, "eps": self.eps, "steps": self.steps, "step_size": self.step_size}
