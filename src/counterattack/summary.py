"""Summaries of a run: per dataset, attack and defense, from its per-batch results; averages; means over seeds.

A record counts an image as robust under an attack when its defense classifies it right (under an adaptive attack,
right under every component); a ``worst-case`` record per dataset and defense follows several attacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .data import PAPER_AVERAGE_DATASETS
from .records import Average, BatchRecord, DefenseBatch, ImageResults, Record, flat
from .stats import mean_and_std, wilson_interval

WORST_CASE = "worst-case"  # the attack name of the per-image worst case over every attack run


@dataclass
class _Sums:
    """What ``summarize`` adds up for one dataset and defense."""

    attacks: Sequence[str]
    n: int = 0
    correct_clean: int = 0
    gate_score: str | None = None
    correct_adv: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)  # images wrong when clean, right when attacked
    parts: dict[str, dict[str, int]] = field(default_factory=dict)  # attack -> component -> correct
    # The gate, per input kind ("clean" and each attack): its scores' sum, how many images (or views) it flagged,
    # and how many scores there were.
    gate: dict[str, list] = field(default_factory=dict)
    forwards: float = 0.0
    backwards: float = 0.0
    defended: float = 0.0
    seconds: float = 0.0
    peak: float | None = None

    def add(self, labels: Sequence[int], result: DefenseBatch) -> None:
        def right(results: ImageResults) -> list[bool]:
            return [p == y for p, y in zip(results.pred, labels, strict=True)]

        self.n += len(labels)
        clean = right(result.clean)
        self.correct_clean += sum(clean)

        def add(attack: str, correct: list[bool]) -> None:
            self.correct_adv[attack] = self.correct_adv.get(attack, 0) + sum(correct)
            fixed = sum(a and not c for a, c in zip(correct, clean, strict=True))
            self.fixed[attack] = self.fixed.get(attack, 0) + fixed

        robust_to_all = [True] * len(labels)
        for attack in self.attacks:
            correct = right(result.adv[attack])
            add(attack, correct)
            for part, results in (result.adv[attack].components or {}).items():  # an adaptive attack's components
                parts = self.parts.setdefault(attack, {})
                parts[part] = parts.get(part, 0) + sum(right(results))
            robust_to_all = [a and b for a, b in zip(robust_to_all, correct, strict=True)]
        if len(self.attacks) > 1:
            add(WORST_CASE, robust_to_all)
        for kind, results in (("clean", result.clean), *result.adv.items()):
            scores = results.gate_scores()
            if scores is not None:
                self.gate_score = result.gate_score
                gate = self.gate.setdefault(kind, [0.0, 0, 0])
                gate[0] += sum(scores)
                gate[1] += sum(flat(results.counterattacked))
                gate[2] += len(scores)
        self.forwards += result.forwards
        self.backwards += result.backwards
        self.defended += result.defended_images
        self.seconds += result.seconds
        if result.peak_memory_mb is not None:
            self.peak = max(self.peak or 0.0, result.peak_memory_mb)

    def gate_mean(self, kind: str, what: int) -> float | None:
        """The mean score (0) or flagged fraction (1) of the gate on one input kind, over its images (or views)."""
        if not self.gate_score or kind == WORST_CASE or kind not in self.gate:
            return None
        return self.gate[kind][what] / self.gate[kind][2]


def summarize(
    batches: Iterable[BatchRecord], datasets: Sequence[str], defenses: Sequence[str], attacks: Sequence[str],
    threat: str = "paper", adaptive: str | None = None, attack_labels: str = "true",
) -> list[Record]:
    """One record per dataset, attack and defense, in the given orders, from per-batch results.

    With several attacks, a ``worst-case`` record per dataset and defense follows them: an image
    counts as robust only if the defense classifies it correctly under every attack.
    """
    attack_names = list(attacks) + ([WORST_CASE] if len(attacks) > 1 else [])
    sums: dict[tuple[str, str], _Sums] = {}
    for batch in batches:
        for name, result in batch.defenses.items():
            sums.setdefault((batch.dataset, name), _Sums(list(attacks))).add(batch.labels, result)
    records = []
    for dataset in datasets:
        for attack in attack_names:
            for name in defenses:
                s = sums.get((dataset, name))
                if s is None:
                    continue
                n = s.n
                clean_scores = attack != WORST_CASE
                records.append(Record(
                    dataset=dataset, attack=attack, threat=threat, adaptive=adaptive, defense=name, n=n,
                    clean_acc=100.0 * s.correct_clean / n, robust_acc=100.0 * s.correct_adv[attack] / n,
                    attack_labels=attack_labels, fixed_by_attack=100.0 * s.fixed[attack] / n,
                    clean_ci95=wilson_interval(s.correct_clean, n),
                    robust_ci95=wilson_interval(s.correct_adv[attack], n),
                    # Under an adaptive attack, the worst case above and each component's own robust accuracy.
                    **{f"robust_acc_{part}": 100.0 * correct / n for part, correct in s.parts.get(attack, {}).items()},
                    gate_score=s.gate_score,  # what the gate's score is: TTC's tau, MAC's corruption degree, ...
                    mean_score_clean=s.gate_mean("clean", 0) if clean_scores else None,
                    mean_score_adv=s.gate_mean(attack, 0),
                    counterattacked_clean=s.gate_mean("clean", 1) if clean_scores else None,
                    counterattacked_adv=s.gate_mean(attack, 1),
                    # The cost of the defense itself, over its clean and adversarial inputs.
                    forwards_per_image=s.forwards / s.defended, backwards_per_image=s.backwards / s.defended,
                    ms_per_image=1000.0 * s.seconds / s.defended, peak_memory_mb=s.peak,
                ))
    return records


def average_records(records: Sequence[Record]) -> list[Average]:
    """Per attack and defense, the mean clean and robust accuracy across datasets.

    Two scopes: ``paper``, over the datasets run that are among the TTC paper's 16 (its headline
    "Average"; Tiny ImageNet and image folders are outside it), and ``all``, over every dataset run.
    """
    averages = []
    for scope, keep in (("paper", lambda d: d in PAPER_AVERAGE_DATASETS), ("all", lambda d: True)):
        groups: dict[tuple[str, str], list[Record]] = {}
        for record in records:
            if keep(record.dataset):
                groups.setdefault((record.attack, record.defense), []).append(record)
        averages += [Average(scope, attack, defense, len(rs), sum(r.clean_acc for r in rs) / len(rs),
                             sum(r.robust_acc for r in rs) / len(rs))
                     for (attack, defense), rs in groups.items()]
    return averages


def combine_seeds(records_per_seed: Sequence[Sequence[Record]], seeds: Sequence[int]) -> list[Record]:
    """Per dataset, attack and defense, the mean over seeds of each accuracy and its sample standard deviation.

    Each seed's run evaluates the same images with other random draws (attack starts, defense noise),
    so the standard deviation is the spread due to randomness alone; the 95% interval (Wilson, at
    the mean accuracy and ``n`` images) is the spread due to the image sample. ``fixed_by_attack`` and the
    components (transfer, exact, bpda) are means too; the warnings and masking reasons are every seed's, each once
    (a seed that finds masking is not hidden by one that does not); other fields are the first seed's.
    """
    keyed = [{(r.dataset, r.attack, r.defense): r for r in records} for records in records_per_seed]
    combined = []
    for record in records_per_seed[0]:
        runs = [by_key[(record.dataset, record.attack, record.defense)] for by_key in keyed]
        merged = replace(record, seeds=list(seeds))
        for kind in ("clean", "robust"):
            values = [getattr(r, f"{kind}_acc") for r in runs]
            mean, std = mean_and_std(values)
            merged = replace(merged, **{f"{kind}_acc": mean, f"{kind}_acc_std": std,
                                        f"{kind}_ci95": wilson_interval(round(mean * record.n / 100), record.n),
                                        f"{kind}_acc_per_seed": values})
        for key in ("fixed_by_attack", "robust_acc_transfer", "robust_acc_exact", "robust_acc_bpda"):
            values = [getattr(r, key) for r in runs]
            if None not in values:
                merged = replace(merged, **{key: sum(values) / len(values)})
        warnings = list(dict.fromkeys(w for r in runs for w in r.warnings or ()))
        reasons = list(dict.fromkeys(reason for r in runs if r.masking not in (None, "none")
                                     for reason in r.masking.split("; ")))
        merged = replace(merged, warnings=warnings or None,
                         masking="; ".join(reasons) if reasons else record.masking)
        combined.append(merged)
    return combined
