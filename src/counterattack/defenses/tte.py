"""Test-time transformation ensembling (TTE; Pérez, Alfarra, Jeanneret, Rueda, Thabet, Ghanem, Arbeláez, 2021).

Average the logits over a fixed set of transformations of the image: with and without a
horizontal flip, each unshifted and shifted by ``shift`` pixels up, down, left and right (a small
crop of the edge-padded image): 10 views, 10 forwards per image, no gradient. The shift is
``max(1, round(size * shift_fraction))`` pixels, 1/16 of the side by default (2 px at 32, 14 px at
224), close to the 4-px crops of 32-px CIFAR training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..randomness import ImageRandomness
from .base import (
    AttackView, DefenseOutput, describe_options, option, register_defense, runtime, shown_views, spread,
)

Transform = Callable[[torch.Tensor], torch.Tensor]


def shifted(dy: int, dx: int) -> Transform:
    """Translate by (dy, dx) pixels, filling the uncovered edge by replication."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        pad = max(abs(dy), abs(dx))
        if pad == 0:
            return x
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        h, w = x.shape[-2:]
        return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]

    return apply


def flipped(transform: Transform) -> Transform:
    return lambda x: transform(torch.flip(x, dims=[-1]))


def default_transforms(size: int, shift_fraction: float = 1 / 16) -> list[Transform]:
    s = max(1, round(size * shift_fraction))
    shifts = [shifted(0, 0), shifted(-s, 0), shifted(s, 0), shifted(0, -s), shifted(0, s)]
    return shifts + [flipped(t) for t in shifts]


@register_defense
@dataclass(frozen=True)
class TransformEnsemble:
    """Pérez et al., 2021: logits averaged over 10 flips and shifts (10 forwards per image)."""

    shift_fraction: float = option(1 / 16, "shift of the shifted views, as a fraction of the image side", high=0.5)
    transforms: Sequence[Transform] | None = runtime()  # None: default_transforms for the image size

    def _views(self, images: torch.Tensor) -> Sequence[Transform]:
        return self.transforms or default_transforms(images.shape[-1], self.shift_fraction)

    def _mean_logits(self, classifier: ZeroShotClassifier, images: torch.Tensor,
                     shown: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The views' mean logits; ``shown`` collects a few views as they were classified, ``spread`` over all but
        the first (the image itself, in the default transforms): of the default 10, shifted up, shifted right,
        flipped and shifted up, flipped and shifted right."""
        transforms = self._views(images)
        chosen = set(spread(len(transforms), first=1 if len(transforms) > 1 else 0))
        logits = []
        for k, transform in enumerate(transforms):
            view = transform(images)
            logits.append(classifier.logits(view))
            if shown is not None and k in chosen:
                shown.append(view)
        return torch.stack(logits).mean(dim=0)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = check_pixels(images).detach().float()
        shown: list[torch.Tensor] = []
        logits = self._mean_logits(classifier, x, shown)
        return DefenseOutput(logits=logits, views=shown_views(shown), view_count=len(self._views(x)))

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """Flips and shifts are differentiable: both methods differentiate the ensemble itself."""
        return AttackView(self._mean_logits(classifier, check_pixels(images)))

    def describe(self) -> dict:
        return {**describe_options(self), "views": len(self.transforms) if self.transforms else 10}
