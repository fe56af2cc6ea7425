"""Anti-Adversary (Alfarra, Pérez, Thabet, Bibi, Torr, Ghanem; AAAI 2022).

Classify x, then take signed-gradient steps that *decrease* the cross-entropy of that predicted
class, moving the image away from the decision boundary, and classify the result.

Choices (the TTC paper gives none beyond using TTC's budget): start at delta = 0, ``steps`` steps of
``step_size`` projected onto the L-inf ball ``eps`` and the [0, 1] box; defaults are TTC's, 4/255,
2 steps of 1/255. The first step's forward at x also gives the prediction, so the cost is
``steps`` forwards and backwards plus one final forward per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attacks.loop import sign_gradient_steps
from ..classifier import ZeroShotClassifier
from ..randomness import ImageRandomness
from .base import DefenseOptions, DefenseOutput


@dataclass(frozen=True)
class AntiAdversary:
    eps: float = 4 / 255
    steps: int = 2
    step_size: float = 1 / 255
    name: str = "anti-adversary"

    @classmethod
    def from_options(cls, options: DefenseOptions) -> "AntiAdversary":
        return cls(options.eps, options.steps, options.step_size)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = images.detach().float()
        predicted: list[torch.Tensor] = []

        def confidence_of_prediction(moved: torch.Tensor) -> torch.Tensor:
            logits = classifier.logits(moved)
            if not predicted:  # the first forward is at x itself
                predicted.append(logits.argmax(-1).detach())
            return -F.cross_entropy(logits, predicted[0], reduction="sum")

        delta = torch.zeros_like(x)
        for delta in sign_gradient_steps(confidence_of_prediction, x, delta, self.eps, self.step_size, self.steps):
            pass
        n = len(x)
        return DefenseOutput(classifier.logits(x + delta), forwards=(self.steps + 1) * n, backwards=self.steps * n, images=x + delta)

    def describe(self) -> dict:
        return {"defense": self.name, "eps": self.eps, "steps": self.steps, "step_size": self.step_size}
