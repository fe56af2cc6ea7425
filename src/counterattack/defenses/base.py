"""The defense protocol: [0, 1] images in, logits and diagnostics out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..classifier import ImageEncoder, ZeroShotClassifier
from ..randomness import ImageRandomness


@dataclass
class DefenseOutput:
    """What a defense returns for a batch.

    ``logits`` rather than images, so a defense can classify from embeddings it already has.
    ``tau`` and ``counterattacked`` are per image (None for defenses without a tau gate).
    Costs are not declared here: ``classifier.count_encoder_passes`` measures them.
    ``images`` are the defended images, for defenses that classify one image per input.
    """

    logits: torch.Tensor
    tau: torch.Tensor | None = None
    counterattacked: torch.Tensor | None = None
    images: torch.Tensor | None = None


@dataclass
class AttackView:
    """A defense's logits as a differentiable function of its input, for adaptive attacks.

    ``tau`` (differentiable too) is given for defenses with a gate, when asked for.
    """

    logits: torch.Tensor
    tau: torch.Tensor | None = None
    tau_thres: float | None = None


# bpda: the defense's perturbation is a constant in the backward pass (straight-through, d(x + delta)/dx = I).
# exact: the unrolled defense is differentiated; sign steps are replayed, gates are constants.
ADAPTIVE_METHODS = ("bpda", "exact")


def through_defense(images: torch.Tensor, delta: torch.Tensor, method: str) -> torch.Tensor:
    """``images + delta``, with ``delta`` differentiated (exact) or held constant (bpda)."""
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
    return images + (delta.detach() if method == "bpda" else delta)


@dataclass(frozen=True)
class DefenseOptions:
    """The knobs shared by the test-time defenses, in [0, 1] pixel units (paper defaults)."""

    eps: float = 4 / 255
    steps: int = 2
    step_size: float = 1 / 255
    tau_thres: float = 0.2
    beta: float = 2.0
    tau_encoder: ImageEncoder | None = None
    precision: str = "fp32"  # of the defense's encoder passes: fp32, bf16 or fp16


class Defense(Protocol):
    name: str

    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput: ...

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str, with_tau: bool = False
    ) -> AttackView:
        """The defended logits, differentiable w.r.t. ``images`` (see ``ADAPTIVE_METHODS``)."""
        ...

    def describe(self) -> dict: ...
