"""Attacks: functions of (classifier, [0, 1] images, labels, per-image randomness) -> adversarial images."""

from __future__ import annotations

from typing import Protocol

import torch

from ..classifier import ZeroShotClassifier
from ..errors import CounterattackError
from ..randomness import ImageRandomness
from .loop import project, sign_gradient_steps, sign_step
from .pgd import PGD


class Attack(Protocol):
    name: str

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor: ...

    def describe(self) -> dict: ...


ATTACKS: dict[str, type] = {"pgd": PGD}


def build_attack(name: str, eps: float, steps: int, step_size: float) -> Attack:
    """An attack by registry name; budgets in [0, 1] pixel units."""
    if name not in ATTACKS:
        raise CounterattackError(f"Unknown attack {name!r}. Available: {', '.join(sorted(ATTACKS))}.")
    return ATTACKS[name](eps=eps, steps=steps, step_size=step_size)


__all__ = ["ATTACKS", "Attack", "PGD", "build_attack", "project", "sign_gradient_steps", "sign_step"]
