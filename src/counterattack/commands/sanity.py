"""``counterattack sanity``: checks of one evaluation against gradient masking (robust accuracy against eps and
against steps, AutoAttack's flags). Returns whether every check passed."""

from __future__ import annotations

import sys
from dataclasses import fields, replace

import torch

from ..attacks import PIXEL
from ..attacks.autoattack import import_pyautoattack
from ..config import RunConfig
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from ..sanity import format_report, run_sanity
from ..store import write_json_atomically
from .checks import check_single_dataset
from .context import open_run

SWEPT = ("eps", "steps")  # what the sanity sweeps change; a step size, where the attack has one, follows them


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

    report = run_sanity(context.classifier(selection.data), selection.data, defense, attack_at, attack.eps / PIXEL,
                        attack.steps, context.settings, selection.chosen, adaptive_attacks=context.adaptive_attacks)
    threat = config.attack.threat
    if threat == "adaptive":
        threat = f"adaptive ({dict(config.attack.adaptive).get('method', 'exact')})"
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
