"""A defense as a plain ``nn.Module``: [0, 1] pixels in, defended logits out.

``defended(classifier, TTC())`` is what you hand to code that expects a classifier: torchattacks,
AutoAttack (``pyautoattack``), RobustBench-style evaluation loops or your own serving code. Attacks
that differentiate it go *through* the defense, along the defense's own adaptive view
(``defense.attack_view``), so their numbers measure the defended model, not the bare CLIP.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .classifier import ZeroShotClassifier
from .defenses import Defense, build_defense
from .defenses.base import ADAPTIVE_METHODS
from .errors import CounterattackError
from .inputs import ArgumentKindError, check_classifier, kind_of
from .randomness import ImageRandomness

# The "dataset" part of every random stream a DefendedModel draws from (unless given another key).
RANDOMNESS_KEY = "defended-model"


def call_purpose(call: int) -> str:
    """The random streams' purpose for the ``call``-th forward (counting from 0) of a DefendedModel."""
    return f"call-{call}"


def check_defense(defense: Any) -> Any:
    """``defense`` itself if it is a defense instance (callable, with an ``attack_view``)."""
    if isinstance(defense, type) or not callable(defense) or not callable(getattr(defense, "attack_view", None)):
        raise ArgumentKindError(f"expected a defense as the defense (an instance such as TTC(), or a registered name "
                                f"such as 'ttc'), got {kind_of(defense)}")
    return defense


def _changes(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module) -> bool:
    """Whether a cast changes any of ``module``'s tensors (``Tensor.to`` and its kin return the tensor itself when
    nothing changes; at most one converted tensor is made and dropped)."""
    return any(fn(t) is not t for t in (*module.parameters(), *module.buffers()))


def _own_copy(classifier: ZeroShotClassifier) -> ZeroShotClassifier:
    """A copy of ``classifier`` to cast: its model (image and text towers, so both follow the cast) and text
    embeddings are copied; its tokenizer and descriptions (no tensors) are shared, its text-side cache starts empty
    (rebuilt on the new device and dtype)."""
    memo: dict[int, Any] = {id(classifier._text_side): {}}
    if classifier.descriptions is not None:
        memo[id(classifier.descriptions)] = classifier.descriptions
    if classifier.clip is not None:
        memo[id(classifier.clip.tokenizer)] = classifier.clip.tokenizer  # a Rust tokenizer may refuse a deep copy
    return copy.deepcopy(classifier, memo)


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

    **Casts.** The classifier is shared with the caller until the module is cast: the first ``.to(...)``,
    ``.double()``, ``.half()``, ``.cuda()`` that changes a tensor casts a copy of it (its model with both towers),
    never the caller's classifier, which keeps its dtype and device. The defense's own modules (a separate
    ``tau_encoder``) are not submodules: put them on the device yourself.
    """

    def __init__(self, classifier: ZeroShotClassifier, defense: Defense, seed: int = 0, method: str = "exact",
                 key: str = RANDOMNESS_KEY):
        super().__init__()
        if method not in ADAPTIVE_METHODS:
            raise CounterattackError(f"Unknown adaptive method {method!r}: one of {', '.join(ADAPTIVE_METHODS)}.")
        self.classifier = check_classifier(classifier)
        self.defense = check_defense(defense)
        self.owns_classifier = False  # True once a cast made the copy this module casts
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

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "DefendedModel":
        if not self.owns_classifier and _changes(fn, self.classifier):
            self.classifier = _own_copy(self.classifier)
            self.owns_classifier = True
        if self.owns_classifier and self.classifier.clip is not None:
            # The text tower is no submodule: cast it with the image tower, so text-side defenses (R-TPT) still run.
            self.classifier.clip.model._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

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
