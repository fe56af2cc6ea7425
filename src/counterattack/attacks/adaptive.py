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

The PGD loop and its projection are the paper's; ``base`` (``PGD`` or ``CW``) gives the budget, the
steps and the loss on the defended logits. The attack starts from ``base``'s adversarial image
against the undefended model (the paper's protocol, from its random start) and goes on through the defense.
It returns, per image, the iterate whose objective (the loss plus the gate term, averaged over
the EOT draws) was highest, as AutoAttack keeps its best point, rather than the last iterate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..classifier import ZeroShotClassifier, check_pixels
from ..defenses.base import ADAPTIVE_METHODS, AttackView, Defense
from ..errors import CounterattackError
from ..randomness import ImageRandomness
from .loop import project, run_steps
from .pgd import PGD

GATE_MARGIN = 1.5  # the gate-evasion term pushes tau up to 1.5 tau_thres


def gate_evasion(view: AttackView) -> torch.Tensor:
    """Per image, a term that grows as the score moves to the unflagged side of the gate, with a margin
    (``GATE_MARGIN``) beyond which it stops: the defense draws its own noise at test time."""
    if view.flagged_above:
        return -view.tau.clamp(min=view.tau_thres / GATE_MARGIN)
    return view.tau.clamp(max=GATE_MARGIN * view.tau_thres)


@dataclass(frozen=True)
class AdaptiveAttack:
    defense: Defense = field(compare=False)
    base: PGD = field(default_factory=PGD)
    method: str = "exact"
    eot_samples: int = 1
    gate_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in ADAPTIVE_METHODS:
            raise CounterattackError(f"Unknown adaptive method {self.method!r}. Available: {', '.join(ADAPTIVE_METHODS)}.")
        if not isinstance(self.base, PGD):
            raise CounterattackError(f"Adaptive attacks run the pgd or cw loop through the defense, not {self.base.name}.")
        if self.eot_samples < 1:
            raise CounterattackError("--eot-samples must be at least 1.")

    @property
    def name(self) -> str:
        return self.base.name

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor:
        images = check_pixels(images).detach().float()
        base = self.base
        transfer = base(classifier, images, labels, rng)
        best_delta = transfer - images
        best_loss = torch.full((len(images),), float("-inf"), device=images.device)

        def keep_best(adv: torch.Tensor, losses: torch.Tensor) -> None:
            improved = losses > best_loss
            best_loss[improved] = losses[improved]
            best_delta[improved] = project(images, adv.detach() - images, base.eps)[improved]

        def objective(adv: torch.Tensor) -> torch.Tensor:
            per_image = adv.new_zeros(len(adv))
            for _ in range(self.eot_samples):
                view = self.defense.attack_view(classifier, adv, rng, self.method, with_tau=self.gate_weight > 0)
                per_image = per_image + base.loss(view.logits, labels)
                if self.gate_weight > 0 and view.tau is not None:
                    per_image = per_image + self.gate_weight * gate_evasion(view)
            per_image = per_image / self.eot_samples
            keep_best(adv, per_image.detach())
            return per_image.sum()

        final = run_steps(objective, images, best_delta.clone(), base.eps, base.step_size, base.steps)
        objective(images + final)  # the last iterate is a candidate too
        return images + best_delta

    def describe(self) -> dict:
        return {**self.base.describe(), "threat": "adaptive", "method": self.method,
                "eot_samples": self.eot_samples, "gate_weight": self.gate_weight, "defense": self.defense.name}
