"""Checks against gradient masking (Carlini et al., "On Evaluating Adversarial Robustness", 2019;
AutoAttack's own flags), run by ``counterattack sanity``.

- robust accuracy must not increase with the budget eps, and an unbounded eps (255/255) must reach
  about 0;
- more attack steps must not help the defense;
- AutoAttack's checks are run on the defended model and their warnings reported: a randomised
  defense, a dynamic one (its forward computes gradients), probabilities instead of logits, and
  images whose gradient is exactly zero.

Sweeps use the step size 2.5 * eps / steps (Madry et al.'s rule), so every point is a sensible attack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attacks import PIXEL, Attack
from .attacks.autoattack import collecting_warnings, import_pyautoattack
from .classifier import ZeroShotClassifier
from .data import EvalDataset, WithIndex, balanced_subset
from .defended_model import defended
from .defenses import Defense
from .evaluate import RunSettings, evaluate_dataset
from .summary import summarize
from .options import large_budgets_meant

UNBOUNDED_EPS = 255.0  # in 1/255: the whole [0, 1] box


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class SanityReport:
    eps_sweep: list[tuple[float, float]] = field(default_factory=list)  # (eps in 1/255, robust %)
    steps_sweep: list[tuple[int, float]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    autoattack_warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)




def _never_increases(points: list[tuple[float, float]], tolerance: float) -> tuple[bool, str]:
    rises = [(a, b) for a, b in pairwise(points) if b[1] > a[1] + tolerance]
    detail = " -> ".join(f"{x:g}: {acc:.1f}%" for x, acc in points)
    return not rises, detail + (f" (rises: {', '.join(f'{a[0]:g}->{b[0]:g}' for a, b in rises)})" if rises else "")


def autoattack_warnings(classifier: ZeroShotClassifier, defense: Defense, images: torch.Tensor, labels: torch.Tensor,
                        seed: int) -> list[str]:
    """Run AutoAttack's checks on the defended model; return what they flag."""
    checks = import_pyautoattack().checks

    model = defended(classifier, defense, seed=seed, method="exact")  # fresh draws at every call
    found: list[str] = []
    logger = logging.getLogger("counterattack.sanity.autoattack")
    logger.propagate = False
    # pyautoattack counts gradient calls in a module-level dict it never resets: without this, a
    # model checked after a dynamic one would be flagged dynamic too.
    checks.funcs.update(dict.fromkeys(checks.funcs, 0))
    with collecting_warnings(logger, found):
        checks.check_randomized(model, images, labels, bs=len(images), logger=logger)
        checks.check_range_output(model, images, logger=logger)
        checks.check_dynamic(model, images, logger=logger)
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
        checks.check_zero_gradients(grad, logger=logger)
    return found


def run_sanity(
    classifier: ZeroShotClassifier,
    data: EvalDataset,
    defense: Defense,
    make_attack: Callable[[float, int, float], Attack],
    base_eps: float,
    base_steps: int,
    settings: RunSettings,
    indices: Sequence[int] | None = None,
    adaptive_attacks: Callable[[Attack, Defense], Mapping[str, Attack]] | None = None,
) -> SanityReport:
    """``make_attack(eps, steps, step_size)`` (pixel units) builds the attack under test; ``indices``
    are the images (default: the class-balanced subset of ``settings.limit``). ``adaptive_attacks``: the
    adaptive attack through the defense, judged as ``eval`` judges it (an image is robust only if it survives
    the transfer attack too)."""
    report = SanityReport()
    indices = balanced_subset(data.targets, settings.limit) if indices is None else list(indices)
    n = len(indices)
    tolerance = max(100.0 / n, 0.5)  # one image, or half a point

    found: dict[tuple[float, int], float] = {}  # both sweeps pass through the attack's own eps and steps: once

    def accuracy(eps: float, steps: int) -> float:
        if (eps, steps) not in found:
            # Madry's 2.5 eps / steps, at most the whole pixel range (an unbounded eps in one or two steps)
            with large_budgets_meant():  # the sweep's unbounded eps is deliberate
                attack = make_attack(eps * PIXEL, steps, min(1.0, 2.5 * eps * PIXEL / max(steps, 1)))
            batches = evaluate_dataset(classifier, data, [attack], [defense], settings, indices=indices,
                                       adaptive_attacks=adaptive_attacks)
            found[eps, steps] = summarize(batches, [data.name], [defense.name], [attack.name])[0].robust_acc
        return found[eps, steps]

    for eps in sorted({base_eps / 2, base_eps, 2 * base_eps, 4 * base_eps, 8 * base_eps, UNBOUNDED_EPS}):
        report.eps_sweep.append((eps, accuracy(eps, base_steps)))
    for steps in sorted({1, 5, base_steps, 2 * base_steps, 5 * base_steps}):
        report.steps_sweep.append((steps, accuracy(base_eps, steps)))

    ok, detail = _never_increases(report.eps_sweep, tolerance)
    report.checks.append(Check("robust accuracy does not increase with eps (1/255)", ok, detail))
    unbounded = report.eps_sweep[-1][1]
    report.checks.append(Check("an unbounded eps (255/255) reaches ~0", unbounded <= tolerance, f"{unbounded:.1f}%"))
    ok, detail = _never_increases(report.steps_sweep, tolerance)
    report.checks.append(Check("more attack steps do not help the defense", ok, detail))

    first = WithIndex(data.dataset, [indices[i] for i in balanced_subset([data.targets[j] for j in indices], 32)])
    images = torch.stack([first[i][0] for i in range(len(first))]).to(settings.device)
    labels = torch.tensor([first[i][1] for i in range(len(first))], device=settings.device)
    report.autoattack_warnings = autoattack_warnings(classifier, defense, images, labels, settings.seed)
    return report


def format_report(report: SanityReport, what: str) -> str:
    lines = [f"Sanity checks for {what}", ""]
    for check in report.checks:
        mark = "PASS" if check.passed else "!!! FAIL"
        lines.append(f"{mark:9} {check.name}: {check.detail}")
    if report.autoattack_warnings:
        lines += ["", "!!! AutoAttack's checks flag this model:"] + [f"!!!   {w}" for w in report.autoattack_warnings]
    else:
        lines += ["", "AutoAttack's checks (randomness, dynamic forward, probability outputs, zero gradients): "
                  "nothing flagged"]
    lines += ["", "ALL CHECKS PASSED" if report.passed
              else "!!! SOME CHECKS FAILED: the robustness numbers may be unreliable"]
    return "\n".join(lines)
