"""``counterattack calibrate``: a gate's score on clean and adversarial images, its ROC AUC as a detector, and
the threshold that flags ``--target-fpr`` of the clean images, with the accuracy the defense gets there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..calibration import flagged_fraction, roc_auc, threshold_at_fpr
from ..config import RunConfig
from ..data import short_name
from ..defenses import DEFENSES, Defense, Gate, build_defense
from ..distributed import ProcessGroup
from ..identity import evaluation_description
from ..records import BatchRecord, RunDescription
from ..errors import CounterattackError
from ..plots import plot_score_histograms
from ..store import write_json_atomically
from .checks import check_single_dataset, single_defense
from .context import Evaluation, open_run


def scores_of(batches: Sequence[BatchRecord], defense: str, attack: str) -> tuple[list[float], list[float]]:
    """Per image, the gate's score on the clean and on the adversarial images (one dataset)."""
    clean, adv = [], []
    for batch in batches:
        result = batch.defenses[defense]
        clean += result.clean.gate_scores()
        adv += result.adv[attack].gate_scores()
    return clean, adv


def _entry(evaluation: Evaluation, attack: str, threshold: float, gate: Gate) -> dict:
    """At one threshold: the flagged fractions and the accuracies the defense gets."""
    (defense,) = evaluation.batches[0].defenses
    clean, adv = scores_of(evaluation.batches, defense, attack)
    (record,) = [r for r in evaluation.records if r.attack == attack]
    return {"threshold": threshold, "flagged_clean": flagged_fraction(clean, threshold, gate.flags_above),
            "flagged_adv": flagged_fraction(adv, threshold, gate.flags_above),
            **{k: getattr(record, k) for k in ("clean_acc", "robust_acc", "clean_ci95", "robust_ci95")}}


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> dict | None:
    name = single_defense(config)
    gate: Gate | None = build_defense(name, **config.defense.settings.get(name, {})).gate  # a gate may follow a setting
    if gate is None:
        gated = [n for n, cls in DEFENSES.items() if cls.gate is not None]  # a gate property (DOC's) counts too
        raise CounterattackError(f"{name} has no gate to calibrate; defenses with one: {', '.join(sorted(gated))}.")
    check_single_dataset(config, "a threshold is chosen per backbone and dataset")
    context = open_run(config, group, device)
    context.adversarial_set()
    attacks, current = context.attacks, context.defenses[name]

    def evaluate(folder: str, defense: Defense) -> tuple[RunDescription, Evaluation | None]:
        defenses = {name: defense}
        described = evaluation_description(context, defenses, attacks)
        return described, context.evaluate_into(config.out / folder, defenses, attacks, described)

    described, before = evaluate("current", current)
    # The main process chooses the threshold from the clean scores; every process evaluates the defense there.
    chosen_threshold = group.share(None if before is None else threshold_at_fpr(
        scores_of(before.batches, name, attacks[0].name)[0], config.study.target_fpr, gate.flags_above))
    chosen = replace(current, **{gate.threshold: chosen_threshold})
    _, after = evaluate(f"at-{chosen_threshold:.6g}", chosen)  # another --target-fpr adds a folder rather than clashing
    if before is None or after is None:
        return None

    dataset = context.selections[0].data.name
    current_threshold = gate.threshold_of(current)
    entries, plots = [], []
    images = sum(len(batch.ids) for batch in before.batches)
    for attack in attacks:
        clean, adv = scores_of(before.batches, name, attack.name)  # MAC: one score per view
        oriented = (lambda xs: xs) if gate.flags_above else (lambda xs: [-x for x in xs])
        entries.append({
            "dataset": dataset, "attack": attack.name, "defense": name, "n": images, "scores": len(clean),
            "score_per": "view" if len(clean) > images else "image", "score": gate.score,
            "flagged": gate.side, "auc": roc_auc(oriented(clean), oriented(adv)), "target_fpr": config.study.target_fpr,
            "current": _entry(before, attack.name, current_threshold, gate),
            "chosen": _entry(after, attack.name, chosen_threshold, gate),
        })
        plots.append(plot_score_histograms(
            clean, adv, current_threshold, chosen_threshold, gate.flags_above,
            f"{name}'s {gate.score} on {short_name(dataset)}, {attack.name} ({len(clean)} {entries[-1]['score_per']}s)",
            config.out / (f"calibration-{attack.name}.png" if len(attacks) > 1 else "calibration.png"), gate.score))
    results = {"config": described.to_json(), "calibration": entries}
    write_json_atomically(config.out / "calibration.json", results)
    side = ">" if gate.flags_above else "<"
    for e in entries:
        print(f"{name} on {short_name(dataset)}, {e['attack']} ({e['n']} images): ROC AUC of its {gate.score} as a "
              f"detector {e['auc']:.3f}")
        for key, what in (("current", "current"), ("chosen", f"at {config.study.target_fpr:g} FPR")):
            c = e[key]
            print(f"  {what:>10}: flagged if {gate.score} {side} {c['threshold']:.6g}: "
                  f"{c['flagged_clean']:.1%} of clean, {c['flagged_adv']:.1%} of adversarial {e['score_per']}s "
                  f"flagged; clean {c['clean_acc']:.2f}%, robust {c['robust_acc']:.2f}%")
    print(f"\nuse it: --{name}-{gate.threshold.replace('_', '-')} {chosen_threshold:.6g}; details: "
          f"{config.out / 'calibration.json'}; histogram(s): {', '.join(map(str, plots))}")
    return results
