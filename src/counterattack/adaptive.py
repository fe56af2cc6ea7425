"""Adaptive attacks: the attack's gradient flows through the defense it attacks.

The paper crafts adversarial images against the undefended CLIP. An attacker who knows the defense
does better; against TTC the literature reports robust accuracy falling to a few percent. Here any
defense of the library can be attacked through its ``attack_view``:

- ``method="exact"``: the unrolled defense is differentiated (sign steps replayed, the gate held),
- ``method="bpda"``: straight-through, the defense's perturbation held constant in the backward pass,
- ``eot_samples=K``: each step averages the loss over K draws of the defense's randomness (EOT),
- ``gate_weight=w``: adds ``w * min(tau, 1.5 tau_thres)``, pushing tau above TTC's threshold (with
  a margin, since the defense draws its own noise at test time) so the image is judged clean and
  left to ``delta0`` alone; for a gate that flags high scores (MAC), ``-w * max(tau, tau_thres / 1.5)``.

``base`` gives the budget, the steps, the loss on the defended logits and its own update rule and projection: any
attack that declares them (``attacks.base.StepAttack``: ``PGD``, ``CW``) runs through a defense in its own threat
model; any other is refused in one line. The attack starts from ``base``'s adversarial image against the undefended
model (the paper's protocol, from its random start) and goes on through the defense.
It returns, per image, the iterate whose objective (the loss plus the gate term, averaged over
the EOT draws) was highest, as AutoAttack keeps its best point, rather than the last iterate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .attacks import ATTACKS, PGD, Attack
from .attacks.base import StepAttack
from .attacks.loop import gradient_steps, last_of
from .classifier import ZeroShotClassifier
from .inputs import check_pixels
from .defenses.base import ADAPTIVE_METHODS, Defense
from .errors import CounterattackError
from .inputs import guard_attack
from .options import check_options, option, options_of, runtime
from .randomness import ImageRandomness

GATE_MARGIN = 1.5  # the gate-evasion term pushes tau up to 1.5 tau_thres
SELECTIONS = ("eot", "fresh")


def gate_evasion(defense: Defense, score: torch.Tensor) -> torch.Tensor:
    """Per image, a term that grows as the score moves to the unflagged side of ``defense``'s gate, with a margin
    (``GATE_MARGIN``) beyond which it stops: the defense draws its own noise at test time."""
    gate = defense.gate
    threshold = gate.threshold_of(defense)
    term = -score.clamp(min=threshold / GATE_MARGIN) if gate.flags_above else score.clamp(max=GATE_MARGIN * threshold)
    return term.flatten(1).sum(dim=1) if term.ndim > 1 else term  # a gate per view (MAC): every view's


STEP_ATTACK = ("eps", "steps", "loss", "step", "project")  # what attacks.base.StepAttack declares


def _lacks(attack: Attack | type) -> list[str]:
    return [name for name in STEP_ATTACK if not hasattr(attack, name)]


def _runs_through_a_defense(attack: Attack) -> None:
    """Refuse, in one line, an attack that does not declare how it steps (it would be run as another attack)."""
    if _lacks(attack):
        runnable = [name for name, cls in ATTACKS.items() if not _lacks(cls)]
        raise CounterattackError(
            f"--threat adaptive runs an attack's own loss and update rule through each defense; {attack.name} has no "
            f"{', '.join(_lacks(attack))} (it is for the paper's protocol). Attacks it can run: {', '.join(runnable)}.")


def check_adaptive(attack: Attack, settings: Mapping[str, Any] | None = None) -> None:
    """Refuse an attack that cannot run through a defense, or adaptive settings out of bounds, with one line."""
    AdaptiveAttack(None, attack, **(settings or {}))


@dataclass(frozen=True)
class AdaptiveAttack:
    """An attack run through a defense: exact or straight-through gradients, EOT, gate evasion."""

    # Its options' flags: --adaptive-eot-samples (--eot-samples), --adaptive-gate-weight (--gate-weight),
    # --adaptive-select.
    defense: Defense = runtime()
    base: StepAttack = runtime()  # an attack that declares how it steps (default: PGD's paper settings)
    # exact: differentiate the unrolled defense; bpda: straight-through. `eval --threat adaptive` runs both (the masking
    # check compares them), so the method is set by code, not by a flag.
    method: str = runtime("exact")
    eot_samples: int = option(1, "draws of the defense's randomness averaged per step (EOT)", low=1,
                              aliases=("--eot-samples",))
    gate_weight: float = option(0.0, "weight of the term pushing a gated defense's score to its unflagged side",
                                aliases=("--gate-weight",))
    # fresh measured at least as strong as eot on TTC and MAC (200 CIFAR-10 images, the tiny CLIP; README).
    select: str = option("fresh", "which iterate an image keeps: fresh (the highest objective under a held-out draw of "
                         "the defense's randomness) or eot (the highest under the attack's own EOT draws, which it "
                         "partly fits)", choices=SELECTIONS)

    def __post_init__(self) -> None:
        if self.base is None:
            object.__setattr__(self, "base", PGD())
        _runs_through_a_defense(self.base)
        if self.method not in ADAPTIVE_METHODS:
            raise CounterattackError(f"Unknown adaptive method {self.method!r}: one of {', '.join(ADAPTIVE_METHODS)}.")
        check_options(self)

    @property
    def norm(self) -> str:
        return self.base.norm

    @property
    def name(self) -> str:
        return self.base.name

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adversarial images through the defense, from ``start`` (the transfer attack's images; default: ``base``
        run here on the undefended model)."""
        images = check_pixels(images).detach().float()
        base = self.base
        transfer = base(classifier, images, labels, rng) if start is None else check_pixels(start).detach().float()
        best_delta = base.project(images, transfer - images)
        best_loss = torch.full((len(images),), float("-inf"), device=images.device)
        held_out = rng.fork("selection")  # draws the attack never ascends: an iterate is not chosen for its own noise

        def keep_best(adv: torch.Tensor, losses: torch.Tensor) -> None:
            improved = losses > best_loss
            best_loss[improved] = losses[improved]
            best_delta[improved] = base.project(images, adv.detach() - images)[improved]

        def per_image_objective(adv: torch.Tensor, draws: ImageRandomness, samples: int) -> torch.Tensor:
            per_image = adv.new_zeros(len(adv))
            for _ in range(samples):
                view = self.defense.attack_view(classifier, adv, draws, self.method, with_score=self.gate_weight > 0)
                per_image = per_image + base.loss(view.logits, labels)
                if self.gate_weight > 0 and view.score is not None:
                    per_image = per_image + self.gate_weight * gate_evasion(self.defense, view.score)
            return per_image / samples

        def objective(adv: torch.Tensor) -> torch.Tensor:
            per_image = per_image_objective(adv, rng, self.eot_samples)
            if self.select == "fresh":
                with torch.no_grad():
                    keep_best(adv, per_image_objective(adv.detach(), held_out, 1))
            else:
                keep_best(adv, per_image.detach())
            return per_image.sum()

        start_delta = best_delta.clone()
        final = last_of(gradient_steps(objective, images, start_delta, base.steps, base.step), start_delta)
        objective(images + final)  # the last iterate is a candidate too
        return images + best_delta

    def describe(self) -> dict:
        return {**self.base.describe(), "threat": "adaptive", "method": self.method,
                **{f.name: getattr(self, f.name) for f in options_of(type(self))}, "defense": self.defense.name}


guard_attack(AdaptiveAttack)  # its inputs are checked like a registered attack's
