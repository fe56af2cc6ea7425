"""A defense as a plain ``nn.Module``: [0, 1] pixels in, defended logits out.

``defended(classifier, TTC())`` is what you hand to code that expects a classifier: torchattacks,
AutoAttack (``pyautoattack``), RobustBench-style evaluation loops or your own serving code. Attacks
that differentiate it go *through* the defense, along the defense's own adaptive view
(``defense.attack_view``), so their numbers measure the defended model, not the bare CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .classifier import ZeroShotClassifier
from .defenses import Defense, build_defense
from .defenses.base import ADAPTIVE_METHODS
from .errors import CounterattackError
from .randomness import ImageRandomness

# The "dataset" part of every random stream a DefendedModel draws from (unless given another key).
RANDOMNESS_KEY = "defended-model"


def call_purpose(call: int) -> str:
    """The random streams' purpose for the ``call``-th forward (counting from 0) of a DefendedModel."""
    return f"call-{call}"


class DefendedModel(nn.Module):
    """``forward(pixels, image_ids=None)``: the defended logits of [0, 1] pixels.

    **Randomness.** A randomised defense (TTC's ``delta0``, random noise) draws afresh at every
    call, as the deployed defense would: an attacker who queries it twice sees two draws. The
    ``k``-th call (``calls`` counts them from 0) draws image ``i``'s noise from
    ``ImageRandomness.for_images(seed, key, [image_ids[i]], call_purpose(k))``, with ``image_ids``
    defaulting to the images' positions in the batch. So the first call's logits are
    ``defense(classifier, pixels, ImageRandomness.for_images(seed, key, ids, "call-0")).logits``, an
    image's draw does not depend on the rest of its batch when you pass ids, and setting
    ``calls = 0`` replays the same sequence of draws.

    **Gradients.** When autograd needs the pixels' gradient (grad enabled and ``pixels.requires_grad``),
    the logits come from ``defense.attack_view(..., method)``: ``"exact"`` differentiates the unrolled
    defense (sign steps replayed with their recorded signs, gates held), ``"bpda"`` treats the
    defense's perturbation as a constant. Otherwise the defense itself runs (cheaper: TTC classifies
    the images it judges clean from an embedding it already has). Both give the same logits for the
    same draw, up to float rounding.

    The defense's own modules (a separate ``tau_encoder``) are not submodules: put them on the
    device yourself.
    """

    def __init__(self, classifier: ZeroShotClassifier, defense: Defense, seed: int = 0, method: str = "exact",
                 key: str = RANDOMNESS_KEY):
        super().__init__()
        if method not in ADAPTIVE_METHODS:
            raise CounterattackError(f"Unknown adaptive method {method!r}: one of {', '.join(ADAPTIVE_METHODS)}.")
        self.classifier = classifier
        self.defense = defense
        self.seed = int(seed)
        self.method = method
        self.key = key
        self.calls = 0

    def randomness(self, image_ids: Sequence[int | str], call: int) -> ImageRandomness:
        """The random streams the ``call``-th forward gives the defense for these images."""
        return ImageRandomness.for_images(self.seed, self.key, image_ids, call_purpose(call))

    def forward(self, pixels: torch.Tensor,
                image_ids: Sequence[int | str] | torch.Tensor | None = None) -> torch.Tensor:
        if image_ids is None:
            ids: list[int | str] = list(range(len(pixels)))
        else:
            ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
            if len(ids) != len(pixels):
                raise ValueError(f"{len(pixels)} images but {len(ids)} image ids")
        rng = self.randomness(ids, self.calls)
        self.calls += 1
        if torch.is_grad_enabled() and pixels.requires_grad:
            return self.defense.attack_view(self.classifier, pixels, rng, self.method).logits
        return self.defense(self.classifier, pixels, rng).logits

    def extra_repr(self) -> str:
        return (f"defense={getattr(self.defense, 'name', type(self.defense).__name__)}, seed={self.seed}, "
                f"method={self.method}")


def defended(classifier: ZeroShotClassifier, defense: Defense | str, seed: int = 0, method: str = "exact",
             key: str = RANDOMNESS_KEY) -> DefendedModel:
    """``classifier`` behind ``defense`` (an instance, or a registered name with its default settings)
    as an ``nn.Module`` mapping [0, 1] pixels to defended logits; see ``DefendedModel``.

    Example::

        model = defended(classifier, TTC(), seed=0)
        adversarial = torchattacks.PGD(model, eps=4 / 255, alpha=1 / 255, steps=10)(images, labels)
        robust = (model(adversarial).argmax(-1) == labels).float().mean()
    """
    if isinstance(defense, str):
        defense = build_defense(defense)
    return DefendedModel(classifier, defense, seed, method, key)
