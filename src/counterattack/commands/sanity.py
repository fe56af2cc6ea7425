"""``counterattack sanity``: checks of one evaluation against gradient masking (robust accuracy against eps and
against steps, AutoAttack's flags, and under adaptive attacks ``eval``'s masking verdict). Returns whether every
check passed."""

from __future__ import annotations

import sys
from dataclasses import fields, replace

import torch

from ..attacks import PIXEL, Attack
from ..attacks.autoattack import import_pyautoattack
from ..config import RunConfig
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from ..claims import check_masking
from ..classifier import ZeroShotClassifier
from ..data import EvalDataset
from ..defenses import Defense
from ..evaluate import evaluate_dataset
from ..sanity import Check, format_report, run_sanity
from ..summary import summarize
from ..store import write_json_atomically
from .checks import check_single_dataset
from .context import RunContext, open_run

SWEPT = ("eps", "steps")  # what the sanity sweeps change; a step size, where the attack has one, follows them


def _masking_check(context: RunContext, classifier: ZeroShotClassifier, data: EvalDataset, chosen: list[int],
                   defense: Defense, attack: Attack) -> Check:
    """``eval``'s gradient-masking verdict on this defense under the attack as given (its own step size)."""
    settings = replace(context.settings, probe=0, rank=0, world_size=1)  # the verdict needs every image
    batches = list(evaluate_dataset(classifier, data, [attack], [defense], settings, indices=chosen,
                                    adaptive_attacks=context.adaptive_attacks))
    records = summarize(batches, [data.name], [defense.name], [attack.name], "adaptive")
    verdict = check_masking(classifier, data, chosen, defense.name, defense, [attack], context.config.attack.adaptive,
                            settings, batches, records, context.config.attack.convergence_images)
    return Check("the gradient is not masked (input gradient, exact against bpda, transfer against adaptive, "
                 "twice the steps and EOT draws)", not verdict.reasons, verdict.masking)


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> bool:
    check_single_dataset(config, "its sweeps are of one model, dataset and defense")
    for part, names in (("--defense", config.defense.names), ("--attack", config.attack.names)):
        if len(names) != 1:
            raise CounterattackError(f"sanity checks one defense under one attack; {part} gives {', '.join(names)}.")
    import_pyautoattack()  # its checks are part of the report
    context = open_run(config, group, device)
    (attack,), (defense,), (selection,) = context.attacks, context.defenses.values(), context.selections
    defense = defense.for_dataset(selection.data.name)
    own = {f.name for f in fields(attack)}
    if not set(SWEPT) <= own:
        raise CounterattackError(f"sanity sweeps an attack's eps and steps; {attack.name} has no "
                                 f"{', '.join(sorted(set(SWEPT) - own))}.")

    def attack_at(eps: float, steps: int, step_size: float):
        changed = {"eps": eps, "steps": steps, **({"step_size": step_size} if "step_size" in own else {})}
        return replace(attack, **changed)

    data, classifier = selection.data, context.classifier(selection.data)
    report = run_sanity(classifier, data, defense, attack_at, attack.eps / PIXEL, attack.steps, context.settings,
                        selection.chosen, adaptive_attacks=context.adaptive_attacks)
    threat = config.attack.threat
    if threat == "adaptive":
        threat = "adaptive (exact and bpda)"
        report.checks.append(_masking_check(context, classifier, data, selection.chosen, defense, attack))
    text = format_report(report, f"{config.model.name} on {selection.data.name}, defense {defense.name}, "
                                 f"{attack.name} ({'paper protocol' if threat == 'paper' else threat})")
    if group.is_main:
        print(text, file=sys.stdout if report.passed else sys.stderr)
        if config.out:
            write_json_atomically(config.out / "sanity.json", {
                "eps_sweep": report.eps_sweep, "steps_sweep": report.steps_sweep,
                "checks": [vars(c) for c in report.checks], "autoattack_warnings": report.autoattack_warnings,
                "passed": report.passed})
    return report.passed
