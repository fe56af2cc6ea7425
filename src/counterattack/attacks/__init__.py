"""Attacks: functions of (classifier, [0, 1] images, labels, per-image randomness) -> adversarial images."""

from __future__ import annotations

from typing import Protocol

import torch

from ..classifier import ZeroShotClassifier
from ..errors import CounterattackError
from ..randomness import ImageRandomness
from .adaptive import AdaptiveAttack
from .autoattack import DEFAULT_APGD_ITERATIONS, AutoAttack
from .loop import project, replay_steps, run_steps, sign_gradient_steps, sign_step
from .losses import LOSSES, cross_entropy, cw_margin
from .pgd import PGD


PIXEL = 1 / 255  # the command line's unit for budgets and step sizes


class Attack(Protocol):
    name: str

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor: ...

    def describe(self) -> dict: ...


ATTACKS: dict[str, str] = {
    "pgd": "L-inf PGD on the cross-entropy",
    "cw": "L-inf PGD on CW's margin loss (kappa 50)",
    "autoattack-paper": "APGD-CE + APGD-DLR (the TTC paper's subset)",
    "autoattack": "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square",
}


def default_steps(name: str) -> int:
    """The paper's iterations: PGD-10 and CW-10; AutoAttack's APGD with pyautoattack's default of 100."""
    return DEFAULT_APGD_ITERATIONS if name in ("autoattack-paper", "autoattack") else 10


def build_attack(name: str, eps: float, steps: int | None = None, step_size: float = 1 / 255) -> Attack:
    """An attack of the paper's protocol by name; budgets in [0, 1] pixel units.

    ``steps`` defaults to ``default_steps(name)``. For AutoAttack, ``steps`` is APGD's number of
    iterations and ``step_size`` is not used (APGD adapts its own).
    """
    steps = default_steps(name) if steps is None else steps
    if name in ("pgd", "cw"):
        return PGD(eps=eps, steps=steps, step_size=step_size, loss="ce" if name == "pgd" else "cw")
    if name in ("autoattack-paper", "autoattack"):
        return AutoAttack(eps=eps, steps=steps, version="paper" if name == "autoattack-paper" else "standard")
    raise CounterattackError(f"Unknown attack {name!r}. Available: {', '.join(ATTACKS)}.")


__all__ = [
    "PIXEL", "ATTACKS", "AdaptiveAttack", "Attack", "AutoAttack", "LOSSES", "PGD", "build_attack", "default_steps", "cross_entropy", "cw_margin",
    "project", "replay_steps", "run_steps", "sign_gradient_steps", "sign_step",
]
