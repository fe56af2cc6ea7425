"""A run's results beside the numbers the TTC paper and the papers that re-ran TTC printed.

Matching is exact: the same model, backbone, defense, attack, budget, steps and dataset, under the
paper's protocol. A record without such a published twin is listed with the reason, never compared
with a near miss: a 4/255 run against a 1/255 number, or another backbone's, would look like a
reproduction failure (or success) that it is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .published import AVERAGE_KEYS, Published, PublishedRecord, Source
from .records import Record, Results, RunDescription

EPS_TOLERANCE = 1e-6  # in 1/255: our eps * 255 against the published budget
MATCHING_RULE = ("exact on model, backbone, defense, attack, budget (our eps x 255 equal to the published one within "
                 "1e-6), steps, dataset and how the adversarial images were stored (float, or 8 bits rounded or "
                 "truncated), for paper-protocol records attacked with the true labels only; nothing is matched "
                 "loosely")
NO_TWIN = "no published twin"
OUTPUT_NAMES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png")


@dataclass(frozen=True)
class ComparisonRow:
    """One of our records beside one source's number for the same setting (percent; ``eps`` in 1/255).

    ``*_diff`` is ours minus published, in points; ``*_inside`` whether the published value lies inside
    our 95% interval (None where the paper printed no clean accuracy or our record has no interval).
    ``notes`` name our defense or attack options that differ from this library's defaults.
    """

    source: str
    source_label: str
    dataset: str
    defense: str
    attack: str
    eps: float
    steps: int
    n: int | None
    ours_clean: float
    ours_robust: float
    published_clean: float | None
    published_robust: float
    clean_diff: float | None
    robust_diff: float
    clean_ci95: tuple[float, float] | None
    robust_ci95: tuple[float, float] | None
    clean_inside: bool | None
    robust_inside: bool | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AverageRow:
    """Our mean accuracy over the datasets we ran of a published average's set, beside that average.

    ``datasets`` are ours, ``scope_size`` how many the source averaged over; when fewer were run, ``note``
    says so, and ``published_same_*`` give the source's own per-dataset numbers averaged over our datasets
    (when it printed every one of them): the like-for-like comparison. No interval: the mean of per-dataset
    accuracies would need one built from every dataset's count, which is not attempted here.
    """

    source: str
    source_label: str
    scope: str
    defense: str
    attack: str
    eps: float
    steps: int
    datasets: tuple[str, ...]
    scope_size: int
    ours_clean: float
    ours_robust: float
    published_clean: float | None
    published_robust: float
    clean_diff: float | None
    robust_diff: float
    published_same_clean: float | None
    published_same_robust: float | None
    note: str = ""


@dataclass(frozen=True)
class UnmatchedRecord:
    """One of our records with no published twin, and why (``eps`` in 1/255, None where unknown)."""

    dataset: str
    defense: str
    attack: str
    threat: str | None
    eps: float | None
    steps: int | None
    reason: str


@dataclass(frozen=True)
class Comparison:
    """Everything ``compare_results`` found: rows per (record, source), averages, records without a twin."""

    model: str | None
    backbone: str | None
    records: int
    rows: tuple[ComparisonRow, ...]
    averages: tuple[AverageRow, ...]
    unmatched: tuple[UnmatchedRecord, ...]
    sources: tuple[Source, ...]  # those cited by a row or an average, in the file's order


def run_identity(config: RunDescription) -> tuple[str | None, str | None]:
    """(model, backbone) of a run, as the published records name them.

    The backbone is the config's ``backbone`` label when a run recorded one; otherwise the pretrained tag
    when no vision checkpoint replaced the tower; otherwise unknown (None), since a checkpoint file's name
    does not say whether it is TeCoA at 1/255 or FARE at 4/255, and an unknown backbone has no twin.
    """
    model = config.model
    if config.backbone:
        return model, config.backbone
    if not config.vision_checkpoint:
        return model, config.pretrained or None
    return model, None


def _budgets(config: RunDescription) -> dict[str, tuple[float | None, int | None] | None]:
    """Per attack name, (eps in 1/255, steps) from the config's attack list; None when listed twice."""
    budgets: dict[str, tuple[float | None, int | None] | None] = {}
    for entry in config.attacks:
        if not isinstance(entry, dict) or not isinstance(entry.get("attack"), str):
            continue
        eps, steps = entry.get("eps"), entry.get("steps")
        eps = 255 * eps if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None
        steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
        budgets[entry["attack"]] = None if entry["attack"] in budgets else (eps, steps)
    return budgets


def _fmt_value(key: str, value: Any) -> str:
    if isinstance(value, float) and key in ("eps", "step_size"):
        return f"{value * 255:.4g}/255"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _differences(given: Mapping[str, Any], defaults: Mapping[str, Any], skip: Sequence[str]) -> list[str]:
    notes = []
    for key, default in defaults.items():
        if key in skip or key not in given:
            continue
        value = given[key]
        same = (math.isclose(value, default, rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(value, (int, float)) and isinstance(default, (int, float)) else value == default)
        if not same:
            notes.append(f"{key}={_fmt_value(key, value)} (default {_fmt_value(key, default)})")
    return notes


def _setting_notes(config: RunDescription, defense: str, attack: str) -> tuple[str, ...]:
    """Our prompts and options that differ from the library's defaults (which follow the papers): not matched on,
    but said."""
    from .attacks import ATTACKS
    from .defenses import DEFENSES
    from .options import defaults_of

    notes = [] if config.prompts == "paper" else [f"prompts {config.prompts} (default paper)"]
    if config.templates:
        notes.append(f"{len(config.templates)} template(s) given (default: the paper's)")
    for entry in config.defenses or []:
        if isinstance(entry, dict) and entry.get("name", entry.get("defense")) == defense and defense in DEFENSES:
            defaults = {"defense": defense, **defaults_of(DEFENSES[defense])}
            notes += [f"{defense} {d}" for d in _differences(entry, defaults, ("defense",))]
    for entry in config.attacks:
        if isinstance(entry, dict) and entry.get("attack") == attack and attack in ATTACKS:
            defaults = {"attack": attack, **defaults_of(ATTACKS[attack]), "norm": ATTACKS[attack].norm}
            notes += [f"{attack} {d}" for d in _differences(entry, defaults, ("attack", "eps", "steps"))]
    return tuple(notes)


def _inside(published: float | None, interval: tuple[float, float] | None) -> bool | None:
    return None if published is None or interval is None else interval[0] <= published <= interval[1]


def _budget_text(eps: float | None, steps: int | None) -> str:
    return f"{'?' if eps is None else f'{eps:.4g}'}/255, {'?' if steps is None else steps} steps"


def _hint(published: Published, model: str, backbone: str, defense: str, attack: str, dataset: str,
          eps: float, steps: int) -> str:
    """What the papers did print near this record, so a user sees which key keeps it from a twin."""
    near = [p for p in published.records if (p.dataset, p.defense, p.attack) == (dataset, defense, attack)]
    if near:
        shown = list(dict.fromkeys(f"{p.model}/{p.backbone} at {_budget_text(p.eps, p.steps)} ({p.source})"
                                   for p in near))
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        return f"{NO_TWIN}: printed for {defense}/{attack} on {dataset} only with {'; '.join(shown[:3])}{more}"
    within = [p for p in published.records
              if p.dataset in AVERAGE_KEYS and dataset in published.average_scope(p.dataset)
              and (p.model, p.backbone, p.defense, p.attack, p.steps) == (model, backbone, defense, attack, steps)
              and abs(eps - p.eps) <= EPS_TOLERANCE]
    if within:
        return f"{NO_TWIN}: printed only inside " + ", ".join(f"{p.dataset} ({p.source})" for p in within)
    return f"{NO_TWIN}: no paper printed {defense} against {attack} on {dataset}"


# How each source's attacks stored their adversarial images before its defenses saw them (absent: in float). A run
# matches a source only with the same images: 8-bit rounding or truncation moves robust accuracy by points.
SOURCE_QUANTIZATION = {"dbd-iclr26": "floor"}


def _images(quantization: str | None) -> str:
    return {"round": "rounded to 8 bits", "floor": "truncated to 8 bits (a PNG)"}.get(quantization or "", "in float")


def _ineligible(record: Record, model: str | None, backbone: str | None) -> str | None:
    """Why a record cannot have a twin whatever the papers printed, or None."""
    threat, defense, attack, dataset = record.threat, record.defense, record.attack, record.dataset
    if threat != "paper":
        return f"{NO_TWIN}: {threat or 'unknown'} threat (the published numbers are all under the paper's protocol)"
    if record.attack_labels != "true":
        return (f"{NO_TWIN}: attacked with the {record.attack_labels} labels (every published number attacked the "
                "true ones)")
    if record.setting or " " in defense:
        return f"{NO_TWIN}: a sweep setting (the papers print each defense at its own settings)"
    if attack == "worst-case":
        return f"{NO_TWIN}: the worst case over this run's attacks (no paper printed it)"
    if dataset.startswith("imagefolder:"):
        return f"{NO_TWIN}: an image folder (no paper ran it)"
    if not model:
        return f"{NO_TWIN}: the config names no model"
    if backbone is None:
        return (f"{NO_TWIN}: unknown backbone (a vision checkpoint replaced the tower and the config has no "
                "\"backbone\" label such as tecoa-eps1)")
    return None


def _budget_problem(attack: str, budgets: Mapping[str, tuple[float | None, int | None] | None]) -> str | None:
    """Why the config does not tell this attack's budget and steps, or None."""
    if attack not in budgets:
        return f"{NO_TWIN}: the config does not list the {attack} attack's budget"
    if budgets[attack] is None:
        return f"{NO_TWIN}: the config lists the {attack} attack twice (which budget is unknown)"
    if None in budgets[attack]:
        return f"{NO_TWIN}: the config gives no budget or steps for the {attack} attack"
    return None


def _source_order(published: Published) -> dict[str, int]:
    return {key: i for i, key in enumerate(published.sources)}


def _dataset_order(published: Published, dataset: str) -> tuple[int, str]:
    order = published.datasets16
    return (order.index(dataset) if dataset in order else len(order), dataset)


def compare_results(results: Results, published: Published) -> Comparison:
    """Match every record of ``results`` with the published numbers; pure.

    One row per (our record, source) with a twin; one average row per published average of this run's
    model, backbone, defense, attack and budget of which we ran at least one dataset; every other record
    listed with the reason it has no twin.
    """
    config = results.config
    model, backbone = run_identity(config)
    budgets = _budgets(config)
    index: dict[tuple, list[PublishedRecord]] = {}
    for p in published.records:
        index.setdefault((p.model, p.backbone, p.defense, p.attack, p.dataset), []).append(p)
    rows: list[ComparisonRow] = []
    unmatched: list[UnmatchedRecord] = []
    eligible: dict[tuple, dict[str, Record]] = {}  # (defense, attack, eps, steps) -> dataset -> record

    for record in results.records:
        budget = budgets.get(record.attack)
        eps, steps = budget if budget else (None, None)
        reason = _ineligible(record, model, backbone) or _budget_problem(record.attack, budgets)
        if reason is None:
            defense, attack, dataset = record.defense, record.attack, record.dataset
            eligible.setdefault((defense, attack, eps, steps), {}).setdefault(dataset, record)
            twins = [p for p in index.get((model, backbone, defense, attack, dataset), [])
                     if abs(eps - p.eps) <= EPS_TOLERANCE and steps == p.steps]
            same_images = [p for p in twins if SOURCE_QUANTIZATION.get(p.source) == config.quantize_adversarial]
            if twins and not same_images:
                theirs = "; ".join(f"{p.source} {_images(SOURCE_QUANTIZATION.get(p.source))}" for p in twins)
                reason = f"{NO_TWIN}: adversarial images {_images(config.quantize_adversarial)} here ({theirs})"
            elif not twins:
                reason = _hint(published, model, backbone, defense, attack, dataset, eps, steps)
            twins = same_images
        if reason is not None:
            unmatched.append(UnmatchedRecord(dataset=record.dataset, defense=record.defense, attack=record.attack,
                                             threat=record.threat, eps=eps, steps=steps, reason=reason))
            continue
        clean, robust, n = record.clean_acc, record.robust_acc, record.n
        clean_ci, robust_ci = record.clean_ci95, record.robust_ci95
        notes = _setting_notes(config, defense, attack)
        for p in twins:
            rows.append(ComparisonRow(
                source=p.source, source_label=published.sources[p.source].label, dataset=dataset, defense=defense,
                attack=attack, eps=p.eps, steps=p.steps, n=n,
                ours_clean=clean, ours_robust=robust, published_clean=p.clean, published_robust=p.robust,
                clean_diff=None if p.clean is None else clean - p.clean, robust_diff=robust - p.robust,
                clean_ci95=clean_ci, robust_ci95=robust_ci, clean_inside=_inside(p.clean, clean_ci),
                robust_inside=_inside(p.robust, robust_ci), notes=notes))

    averages = _averages(published, model, backbone, config.quantize_adversarial, eligible)
    sources_order = _source_order(published)
    rows.sort(key=lambda r: (sources_order[r.source], _dataset_order(published, r.dataset), r.defense, r.attack, r.eps))
    cited = {r.source for r in rows} | {a.source for a in averages}
    return Comparison(model=model, backbone=backbone, records=len(results.records), rows=tuple(rows),
                      averages=tuple(averages), unmatched=tuple(unmatched),
                      sources=tuple(s for key, s in published.sources.items() if key in cited))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _averages(published: Published, model: str | None, backbone: str | None, quantization: str | None,
              eligible: Mapping[tuple, Mapping[str, Record]]) -> list[AverageRow]:
    """Our mean over the datasets run of each published average's set (of a source whose adversarial images were
    stored as this run's were), named when it is not the whole set."""
    per_dataset = {(p.source, p.model, p.backbone, p.defense, p.attack, p.eps, p.steps, p.dataset): p
                   for p in published.records}
    averages = []
    for p in published.records:
        if (p.dataset not in AVERAGE_KEYS or (p.model, p.backbone) != (model, backbone)
                or SOURCE_QUANTIZATION.get(p.source) != quantization):
            continue
        scope = published.average_scope(p.dataset)
        ours = next((by_dataset for (defense, attack, eps, steps), by_dataset in eligible.items()
                     if (defense, attack, steps) == (p.defense, p.attack, p.steps)
                     and abs(eps - p.eps) <= EPS_TOLERANCE), {})
        run = [d for d in scope if d in ours]
        if not run:
            continue
        clean, robust = _mean([ours[d].clean_acc for d in run]), _mean([ours[d].robust_acc for d in run])
        theirs = [per_dataset.get((p.source, p.model, p.backbone, p.defense, p.attack, p.eps, p.steps, d)) for d in run]
        same_robust = _mean([t.robust for t in theirs]) if all(theirs) else None
        same_clean = (_mean([t.clean for t in theirs])
                      if all(theirs) and all(t.clean is not None for t in theirs) else None)
        note = ""
        if len(run) < len(scope):
            missing = [d for d in scope if d not in ours]
            listed = f" (missing {', '.join(missing)})" if len(missing) <= 4 else ""
            note = f"average over {len(run)} of {len(scope)} datasets{listed}: not the published average's scope"
        averages.append(AverageRow(
            source=p.source, source_label=published.sources[p.source].label, scope=p.dataset, defense=p.defense,
            attack=p.attack, eps=p.eps, steps=p.steps, datasets=tuple(run), scope_size=len(scope), ours_clean=clean,
            ours_robust=robust, published_clean=p.clean, published_robust=p.robust,
            clean_diff=None if p.clean is None else clean - p.clean, robust_diff=robust - p.robust,
            published_same_clean=same_clean, published_same_robust=same_robust, note=note))
    return averages
