"""The attack protocol and registry: one file is one attack, its options become ``--NAME-FIELD`` flags."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from ..classifier import ZeroShotClassifier
from ..inputs import guard_attack
from ..options import PIXEL, Registry, describe_options
from ..randomness import ImageRandomness

__all__ = ["ATTACKS", "PIXEL", "Attack", "register_attack"]


class Attack(Protocol):
    """Adversarial images from [0, 1] images and labels, every random draw from the images' own streams."""

    name: ClassVar[str]

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor: ...

    def describe(self) -> dict: ...


# An attack that leaves out ``describe`` is described by its options.
ATTACKS = Registry("attack", required=("__call__",), defaults={"describe": describe_options}, guard=guard_attack)
register_attack = ATTACKS.register  # @register_attack on a frozen dataclass: its options become --NAME-FIELD flags
