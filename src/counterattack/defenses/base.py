"""The defense protocol: [0, 1] images in, logits and diagnostics out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..augment import REFERENCE_SIDE
from ..classifier import ImageEncoder, ZeroShotClassifier
from ..inputs import guard_defense
from ..options import PIXEL_UNIT, Registry, check_options, describe_options, option, options_of, runtime
from ..randomness import ImageRandomness


@dataclass
class DefenseOutput:
    """What a defense returns for a batch.

    ``logits`` rather than images, so a defense can classify from embeddings it already has.
    ``score`` (the gate's score: TTC's tau, MAC's corruption degree, ...) and ``counterattacked``
    are per image (None for defenses without a gate).
    Costs are not declared here: ``classifier.count_encoder_passes`` measures them.
    ``images`` are the defended images, for defenses that classify one image per input.

    What the gallery shows of a defense that changes no pixel of its input, read off what it already computed
    (no extra encoder pass, no extra random draw: its logits are the same with or without them):

    - ``views``: a few (at most ``SHOWN_VIEWS``) of the views it classified, each a batch ``(n, 3, h, w)`` in
      [0, 1], detached copies (``shown_views``) so that they keep none of the defense's larger tensors alive;
      views may differ in size from one another (DBD's crops are at the model's side, its pixel views at the
      input's). ``view_count``: how many views of each image it classified, the image itself included where it
      is one of them (AGC's 33: the image and 32 warps), of which these are a few.
    - ``feature_shift``: per image, the angle in degrees between the image feature it classifies with and
      f(input), for defenses that move features (DBD's f*, AGC's g, CLIPure's purified z): ``feature_angle``.
    """

    logits: torch.Tensor
    score: torch.Tensor | None = None
    counterattacked: torch.Tensor | None = None
    images: torch.Tensor | None = None
    views: list[torch.Tensor] | None = None
    view_count: int | None = None
    feature_shift: torch.Tensor | None = None


# The most views of an image a defense hands the gallery (``DefenseOutput.views``).
SHOWN_VIEWS = 4


def shown_views(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached float32 copies of the first ``SHOWN_VIEWS`` of ``views`` (each ``(n, 3, h, w)``), the very values
    classified (a copy, so that a slice of a larger tensor does not keep that tensor alive)."""
    return [view.detach().float().clone() for view in list(views)[:SHOWN_VIEWS]]


def spread(count: int, first: int = 0) -> list[int]:
    """At most ``SHOWN_VIEWS`` indices spread evenly over ``first..count-1`` (both ends included): which of a
    defense's like views the gallery shows."""
    available = count - first
    if available <= SHOWN_VIEWS:
        return list(range(first, count))
    return [first + round(k * (available - 1) / (SHOWN_VIEWS - 1)) for k in range(SHOWN_VIEWS)]


def feature_angle(moved: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per row, the angle in degrees between ``moved`` and ``original`` (``(n, d)``, any norms), in float64:
    ``2 atan2(|a - b|, |a + b|)`` of the unit vectors, accurate near 0 and 180 degrees where arccos is not."""
    a = F.normalize(moved.detach().double(), dim=-1)
    b = F.normalize(original.detach().double(), dim=-1)
    return torch.rad2deg(2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)))


@dataclass(frozen=True)
class Gate:
    """How a gated defense decides, per image, whether to counterattack: one score against one threshold.

    ``score`` is what records, plots and calibration call the score; ``threshold`` names the option
    holding the threshold; ``flags_above``: a score above the threshold flags the image (MAC's
    corruption degree), else a score below it does (TTC's "falsely stable" tau, DOC, CSR).
    """

    score: str
    flags_above: bool = False
    threshold: str = "tau_thres"

    @property
    def side(self) -> str:
        return "above" if self.flags_above else "below"

    def flagged(self, scores: Any, threshold: float) -> Any:
        """Which of ``scores`` (a tensor or an array) the gate flags; a score equal to the threshold is not flagged."""
        return scores > threshold if self.flags_above else scores < threshold

    def threshold_of(self, defense: Any) -> float:
        """The defense's threshold: the value of the option this gate names."""
        return getattr(defense, self.threshold)

    def flags(self, defense: Any, scores: Any) -> Any:
        """Which of ``scores`` ``defense`` flags at its own threshold: how every gated defense decides."""
        return self.flagged(scores, self.threshold_of(defense))


@dataclass
class AttackView:
    """A defense's logits as a differentiable function of its input, for adaptive attacks.

    ``score`` (differentiable too) is the gate's score, given for gated defenses when asked for; the
    defense's own ``gate`` says how it is read.
    """

    logits: torch.Tensor
    score: torch.Tensor | None = None


# bpda: the defense's perturbation is a constant in the backward pass (straight-through, d(x + delta)/dx = I).
# exact: the unrolled defense is differentiated; sign steps are replayed, gates are constants.
ADAPTIVE_METHODS = ("bpda", "exact")


def through_defense(images: torch.Tensor, delta: torch.Tensor, method: str) -> torch.Tensor:
    """``images + delta``, with ``delta`` differentiated (exact) or held constant (bpda)."""
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
    return images + (delta.detach() if method == "bpda" else delta)



# TTC's budget (Xing et al. 2025), which the paper also gives the baseline defenses: 4/255, 2 steps of 1/255.
TTC_EPS = 4 / 255
TTC_STEPS = 2
TTC_STEP_SIZE = 1 / 255

def _the_same_on_every_dataset(defense: Defense, dataset: str) -> Defense:
    return defense


def _no_score_encoder(defense: Defense, encoder: ImageEncoder) -> Defense:
    return defense


# Whether a defense reads class descriptions (``--descriptions``, ``classifier.descriptions``): not at all, optionally
# (it falls back to its templates alone) or only with them; ``descriptions_needed``: the fewest sentences per class
# it works with.
READS_DESCRIPTIONS = ("no", "optional", "required")

# --precision paper: the precision a defense's authors' code ran it in (the TTC code's fp16 autocast, unless a
# defense says otherwise). What a defense leaves out, the registry supplies: no gate, its options as its
# description, the same settings on every dataset, no separate score encoder, no class descriptions.
DEFENSES = Registry("defense", required=("__call__", "attack_view"), guard=guard_defense,
                    defaults={"gate": None, "for_dataset": _the_same_on_every_dataset, "paper_precision": "fp16",
                              "describe": describe_options, "with_score_encoder": _no_score_encoder,
                              "reads_descriptions": "no", "descriptions_needed": 1})
register_defense = DEFENSES.register  # @register_defense on a frozen dataclass: its options become --NAME-FIELD flags


def weighted_mix(deltas: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * deltas[k]``: how TTC (and its successors) combine the perturbations they kept."""
    return sum(w.to(d.dtype) * d for w, d in zip(weights.to(deltas[0].device), deltas, strict=True))


def softmax_weights(beta: float, count: int) -> torch.Tensor:
    """``w_k = exp(beta k) / sum_j exp(beta j)`` for k = 0..count-1 (float64)."""
    return torch.softmax(beta * torch.arange(count, dtype=torch.float64), dim=0)


class Defense(Protocol):
    name: ClassVar[str]
    gate: ClassVar[Gate | None]  # None: the defense treats every image alike
    paper_precision: ClassVar[str]  # --precision paper: as its authors' code ran it (fp16 or fp32)
    reads_descriptions: ClassVar[str]  # one of READS_DESCRIPTIONS
    descriptions_needed: ClassVar[int]

    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput: ...

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """The defended logits, differentiable w.r.t. ``images`` (see ``ADAPTIVE_METHODS``)."""
        ...

    def describe(self) -> dict:
        """What records say of the defense: its options by default."""
        ...

    def for_dataset(self, dataset: str) -> Defense:
        """The defense as it runs on ``dataset`` (a setting the authors choose per dataset); itself by default."""
        ...

    def with_score_encoder(self, encoder: ImageEncoder) -> Defense:
        """The defense with its gate's score measured on ``encoder`` (TTC's tau on the original CLIP under a
        fine-tuned tower); itself by default, for a defense without that capability."""
        ...


__all__ = [
    "ADAPTIVE_METHODS", "DEFENSES", "PIXEL_UNIT", "READS_DESCRIPTIONS", "REFERENCE_SIDE", "SHOWN_VIEWS", "TTC_EPS",
    "TTC_STEPS", "TTC_STEP_SIZE",
    "AttackView", "Defense", "Gate", "DefenseOutput", "check_options", "describe_options", "feature_angle", "option",
    "options_of", "register_defense", "runtime", "shown_views", "softmax_weights", "spread", "through_defense",
    "weighted_mix",
]
