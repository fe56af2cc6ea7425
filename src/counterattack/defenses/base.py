"""The defense protocol: [0, 1] images in, logits and diagnostics out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch

from ..classifier import ZeroShotClassifier
from ..errors import CounterattackError
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

    ``tau`` (differentiable too) is given for defenses with a gate, when asked for. A score below
    ``tau_thres`` flags the image (TTC, DOC, CSR) unless ``flagged_above`` (MAC: a score above it flags).
    """

    logits: torch.Tensor
    tau: torch.Tensor | None = None
    tau_thres: float | None = None
    flagged_above: bool = False


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

PIXEL_UNIT = "1/255"  # an option in pixel units is given in 1/255 on the command line


def option(default: Any, help: str, *, unit: str | None = None, low: float | None = 0, high: float | None = None,
           choices: Sequence[str] | None = None, aliases: Sequence[str] = ()) -> Any:
    """A defense's (or attack's) setting: a dataclass field whose metadata generates its command-line flag.

    ``unit=PIXEL_UNIT`` marks a budget or step size: stored in [0, 1] pixel units, given in 1/255
    on the command line (and bounded by 255 there). ``aliases`` are older flag spellings.
    """
    if unit == PIXEL_UNIT and high is None:
        high = 1.0
    return field(default=default, metadata={"help": help, "unit": unit, "low": low, "high": high, "choices": choices,
                                            "aliases": tuple(aliases), "cli": True})


def runtime(default: Any = None) -> Any:
    """A field set by code, not from the command line (an encoder, a list of transforms)."""
    return field(default=default, compare=False, repr=False, metadata={"cli": False})


def options_of(cls: type) -> list[Field]:
    """The command-line settings of a registered class, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("cli")]


def describe_options(instance: Any) -> dict:
    """``{"defense": name, option: value, ...}`` of a registered defense or attack, as results record it."""
    kind = "defense" if instance.name in DEFENSES else "attack"
    return {kind: instance.name, **{f.name: getattr(instance, f.name) for f in options_of(type(instance))}}


def check_options(instance: Any) -> None:
    """Refuse values outside an option's bounds or choices, or not finite, with the option's name."""
    for f in options_of(type(instance)):
        value, meta = getattr(instance, f.name), f.metadata
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                raise CounterattackError(f"{instance.name}: {f.name} must be one of {', '.join(meta['choices'])}, got {value!r}.")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) and not (math.isinf(value) and value > 0 and meta["high"] is None):
            raise CounterattackError(f"{instance.name}: {f.name} must be a finite number, got {value}.")
        if meta["low"] is not None and value < meta["low"]:
            raise CounterattackError(f"{instance.name}: {f.name} must be >= {meta['low']:g}, got {value:g}.")
        if meta["high"] is not None and value > meta["high"]:
            raise CounterattackError(f"{instance.name}: {f.name} must be <= {meta['high']:g}, got {value:g}.")


DEFENSES: dict[str, type] = {}


def register_defense(cls: type) -> type:
    """Register a defense class under its module's name (``_`` written ``-``): one file is one defense.

    The class is a frozen dataclass whose ``option`` fields are its settings with their defaults;
    the command line gets ``--NAME-FIELD`` flags for them, ``counterattack defenses`` lists them.
    """
    name = cls.__module__.rsplit(".", 1)[-1].replace("_", "-")
    if name in DEFENSES and DEFENSES[name] is not cls:
        raise ValueError(f"two defenses are named {name!r}: {DEFENSES[name].__module__} and {cls.__module__}")
    cls.name = name
    DEFENSES[name] = cls
    return cls


def weighted_mix(deltas: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * deltas[k]``: how TTC (and its successors) combine the perturbations they kept."""
    return sum(w.to(d.dtype) * d for w, d in zip(weights.to(deltas[0].device), deltas))


def softmax_weights(beta: float, count: int) -> torch.Tensor:
    """``w_k = exp(beta k) / sum_j exp(beta j)`` for k = 0..count-1 (float64)."""
    return torch.softmax(beta * torch.arange(count, dtype=torch.float64), dim=0)


class Defense(Protocol):
    name: ClassVar[str]

    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput: ...

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str, with_tau: bool = False
    ) -> AttackView:
        """The defended logits, differentiable w.r.t. ``images`` (see ``ADAPTIVE_METHODS``)."""
        ...

    def describe(self) -> dict: ...
