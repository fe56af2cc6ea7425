"""The attack protocol and registry: one file is one attack, its options become ``--NAME-FIELD`` flags."""

from __future__ import annotations

import inspect
from typing import ClassVar, Protocol

import torch

from ..classifier import ZeroShotClassifier
from ..inputs import guard_attack
from ..options import PIXEL, Registry, describe_options
from ..randomness import ImageRandomness

__all__ = ["ATTACKS", "NORMS", "PIXEL", "Attack", "StepAttack", "distance", "register_attack", "takes_start"]


NORMS = ("linf", "l2")  # the distances a threat model's budget can be measured in


class Attack(Protocol):
    """Adversarial images from [0, 1] images and labels, every random draw from the images' own streams.

    ``norm`` is the threat model's distance: the budget ``eps`` bounds ``delta`` in it. An attack that takes
    ``start`` (adversarial images to go on from, instead of its own start) declares it in ``__call__``.
    """

    name: ClassVar[str]
    norm: ClassVar[str]  # one of NORMS

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor: ...

    def describe(self) -> dict: ...


class StepAttack(Protocol):
    """An attack that can run through a defense (``--threat adaptive``): its budget and steps, the loss it ascends
    and its own update rule, which ``AdaptiveAttack`` runs on the defended logits instead of the bare ones."""

    eps: float
    steps: int

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image, what the attack ascends."""

    def step(self, images: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One update of ``delta`` from the loss's gradient, projected (``project``)."""

    def project(self, images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` within the budget's ball (in ``norm``) and ``images + delta`` within [0, 1]."""


def distance(norm: str, delta: torch.Tensor) -> torch.Tensor:
    """Per image, the size of a perturbation in a threat model's norm."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def takes_start(attack: Attack) -> bool:
    """Whether ``attack`` declares a ``start`` (images to go on from) in its ``__call__``."""
    return "start" in inspect.signature(type(attack).__call__).parameters


def describe_attack(attack: Attack) -> dict:
    """An attack's options and its threat model's norm: what records say of it."""
    return {**describe_options(attack), "norm": attack.norm}


# An attack declares its threat model's norm (an L2 attack recorded and budget-checked as L-inf would be wrong
# without a word); what it leaves out, the registry supplies: a description by its options and norm.
ATTACKS = Registry("attack", required=("__call__",), declared={"norm": NORMS}, defaults={"describe": describe_attack},
                   guard=guard_attack)
register_attack = ATTACKS.register  # @register_attack on a frozen dataclass: its options become --NAME-FIELD flags
