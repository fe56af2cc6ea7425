"""Tables and plots of evaluation results: the terminal table, and ``counterattack report DIR``.

The report holds Markdown and CSV tables in the layout of the paper's Table 1 (defenses as rows,
datasets and their average as columns, clean and robust accuracy) with the cost of each defense,
a histogram of tau on clean and adversarial images per dataset (TTC's "falsely stable" picture)
and accuracy bars per dataset and defense.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from .data import PAPER_AVERAGE_DATASETS, short_name
from .summary import average_records
from .plots import plot_accuracy, plot_gate_histograms
from .records import Average, Record, Results, RunDescription
from .results import ResultsStore
from .store import write_atomically

_COLUMNS = (
    ("dataset", "dataset", "{}"),
    ("attack", "attack", "{}"),
    ("defense", "defense", "{}"),
    ("n", "n", "{}"),
    ("clean_acc", "clean %", "{:.2f}"),
    ("clean_acc_std", "± clean", "{:.2f}"),
    ("clean_ci95", "clean 95%", "{0[0]:.1f}-{0[1]:.1f}"),
    ("robust_acc", "robust %", "{:.2f}"),
    ("robust_acc_std", "± robust", "{:.2f}"),
    ("robust_ci95", "robust 95%", "{0[0]:.1f}-{0[1]:.1f}"),
    ("fixed_by_attack", "fixed %", "{:.1f}"),
    ("masking", "masking", "{}"),
    ("gate_score", "gate score", "{}"),
    ("mean_score_clean", "score clean", "{:.4f}"),
    ("mean_score_adv", "score adv", "{:.4f}"),
    ("counterattacked_clean", "CA clean", "{:.1%}"),
    ("counterattacked_adv", "CA adv", "{:.1%}"),
    ("forwards_per_image", "fwd/img", "{:.2f}"),
    ("backwards_per_image", "bwd/img", "{:.2f}"),
    ("ms_per_image", "ms/img", "{:.2f}"),
)
_ONLY_IF_GIVEN = ("clean_acc_std", "robust_acc_std", "masking")  # runs over several seeds; adaptive runs


def _cell(record: Record, key: str, fmt: str) -> str:
    value = getattr(record, key)
    return "-" if value is None else fmt.format(value)


def format_table(records: Sequence[Record]) -> str:
    """A plain-text table, one row per record; missing values print as '-'."""
    columns = [c for c in _COLUMNS
               if c[0] not in _ONLY_IF_GIVEN or any(getattr(r, c[0]) is not None for r in records)]
    header = [title for _, title, _ in columns]
    rows = [[_cell(r, key, fmt) for key, _, fmt in columns] for r in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


TABLE_KEY = ("fixed %: wrong when clean, right when attacked (label leakage shows there); CA: the share the gate "
             "flagged; masking: whether the gradient attacks could trust the defense's gradient. report.md says how "
             "to read them.")


def warnings_of(records: Sequence[Record]) -> list[str]:
    """Every warning of the records, once each, in their order."""
    return list(dict.fromkeys(w for r in records for w in (r.warnings or [])))


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def paper_tables(records: Sequence[Record]) -> str:
    """Markdown in the paper's Table 1 layout: clean accuracy, robust accuracy per attack (defenses x
    datasets + averages), then the cost of each defense.

    Two averages: over the TTC paper's 16 datasets among those run (its headline number), and over
    everything run.
    """
    averages = {(a.scope, a.attack, a.defense): a for a in average_records(records)}
    attacks = _ordered(r.attack for r in records)
    datasets = _ordered(r.dataset for r in records)
    defenses = _ordered(r.defense for r in records)
    by_key = {(r.attack, r.dataset, r.defense): r for r in records}
    counts = {scope: max((a.datasets for (s, _, _), a in averages.items() if s == scope), default=0)
              for scope in ("paper", "all")}
    header = ["defense", *map(short_name, datasets),
              f"average, paper's datasets ({counts['paper']} of {len(PAPER_AVERAGE_DATASETS)})",
              f"average, all ({counts['all']})"]

    def cell(record: Record | Average | None, key: str) -> str:
        if record is None:
            return "-"
        std = getattr(record, f"{key}_std", None)  # runs over several seeds: mean ± sample standard deviation
        interval = getattr(record, key.replace("_acc", "_ci95"), None)  # averages have none
        return (f"{getattr(record, key):.2f}" + ("" if std is None else f" ± {std:.2f}")
                + ("" if interval is None else f" ({interval[0]:.1f}–{interval[1]:.1f})"))

    def table(attack: str, key: str) -> str:
        rows = []
        for defense in defenses:
            values = [by_key.get((attack, d, defense)) for d in datasets]
            means = [averages.get((scope, attack, defense)) for scope in ("paper", "all")]
            rows.append([defense] + [cell(r, key) for r in values + means])
        return _markdown(header, rows)

    # Clean accuracy does not depend on the attack: the first attack's records give it.
    sections = [f"### Clean accuracy (%)\n\n{table(attacks[0], 'clean_acc')}"]
    sections += [f"### Robust accuracy (%), attack {attack}\n\n{table(attack, 'robust_acc')}" for attack in attacks]
    cost_rows = []
    for defense in defenses:
        rs = [r for r in records if r.defense == defense and r.attack == attacks[0]]
        peaks = [r.peak_memory_mb for r in rs if r.peak_memory_mb is not None]

        def mean(key: str, rs: list[Record] = rs) -> str:
            values = [getattr(r, key) for r in rs]
            return "-" if None in values else f"{sum(values) / len(values):.2f}"

        cost_rows.append([defense, mean("forwards_per_image"), mean("backwards_per_image"), mean("ms_per_image"),
                          f"{max(peaks):.0f}" if peaks else "-"])
    sections.append("### Cost per image of each defense\n\n" + _markdown(
        ["defense", "forwards", "backwards", "ms", "peak GPU memory (MB)"], cost_rows))
    return "\n\n".join(sections)


def claims_table(records: Sequence[Record]) -> str:
    """Markdown: per dataset, attack and defense, clean and robust accuracy beside ``fixed %`` and, under adaptive
    attacks, the masking verdict with the components behind the robust number."""
    adaptive = any(r.masking is not None for r in records)
    header = ["dataset", "attack", "defense", "clean %", "robust %", "fixed %"]
    header += ["transfer / exact / bpda %", "masking"] if adaptive else []

    def number(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    rows = []
    for r in records:
        row = [short_name(r.dataset), r.attack, r.defense, number(r.clean_acc), number(r.robust_acc),
               number(r.fixed_by_attack)]
        if adaptive:
            row += [" / ".join(number(v) for v in (r.robust_acc_transfer, r.robust_acc_exact, r.robust_acc_bpda)),
                    r.masking or "-"]
        rows.append(row)
    return "### Label leakage and gradient masking\n\n" + _markdown(header, rows)


READING = ("How to read the checks: `fixed %` is the share of images a defense gets wrong when clean but right when "
           "attacked. An attack crafted with the true label pushes an image away from it; a defense that walks the "
           "image back along the perturbation then reaches the true class, even for images it gets wrong when clean "
           "(label leakage): robust accuracy above clean, or a large `fixed %`, calls for the same run with "
           "`--attack-labels predicted`. Under `--threat adaptive`, `masking` says whether the defense's gradient "
           "vanishes (zero or tiny input gradient), misleads (bpda or the transfer attack clearly stronger than the "
           "exact attack) or was not followed far enough (twice the steps and EOT draws take more than a point more): "
           "a robust accuracy that rests on any of these is an upper bound, not a measurement.")


def _what_was_run(config: RunDescription, records: Sequence[Record]) -> str:
    """The attacks, the prompts and how many images stand behind each number, in words."""
    attacks = "; ".join(f"`{json.dumps(a)}`" for a in config.attacks)
    images = ", ".join(f"{short_name(d)}: {n}" for d, n in dict.fromkeys((r.dataset, r.n) for r in records))
    prompt_words = ("the TTC code's per-dataset prompts" if config.prompts == "paper"
                    else "curated class names with one template")
    prompt_words += " for benchmark datasets; image folders use their folder names"
    if config.templates:
        prompt_words += f", templates overridden by {config.templates}"
    seeds = f"seed {config.seed}"
    if config.seeds:
        draws = ("the defenses' random draws; the adversarial images are one stored set" if config.adversarial
                 else "the random draws of the attacks and the defenses")
        seeds = (f"seeds {', '.join(map(str, config.seeds))}: each accuracy is the mean over them ± the sample "
                 f"standard deviation (the spread due to {draws}); its 95% interval is the image sample's")
    worst = " `worst-case`: an image counts as robust only if it survives every attack." if any(
        r.attack == "worst-case" for r in records) else ""
    quantized = {"round": "rounded", "floor": "truncated"}.get(config.quantize_adversarial or "")
    stored = f" Adversarial images {quantized} to 8 bits before the defenses." if quantized else ""
    if config.adversarial:
        stored += (f" Adversarial images read from a stored set (hash {config.adversarial['hash']}, crafted with "
                   f"seed {config.adversarial['seed']}).")
    labels = ("the true labels" if config.attack_labels == "true"
              else "the undefended model's clean predictions (accuracy is still the true labels')")
    return (f"Attacks ({config.threat} threat), crafted against {labels}: {attacks}.{worst}{stored}\n\n"
            f"Prompts: `{config.prompts}` ({prompt_words}). Images per dataset: {images}; {seeds}.")


def gate_thresholds(described: Sequence[dict]) -> dict[str, float]:
    """Each gated defense's threshold (by the name its records carry), read from the option its gate names."""
    from .defenses import DEFENSES

    found = {}
    for entry in described:
        defense = DEFENSES.rebuild(entry)  # a gate may follow a setting (DOC's names its score)
        if defense is not None and defense.gate is not None:
            found[entry.get("name", entry["defense"])] = defense.gate.threshold_of(defense)
    return found


def write_report(out: Path) -> list[Path]:
    """Write report.md, report.csv and the PNG plots from a run folder's results."""
    out = Path(out)
    results = Results.read(out)
    records, config = results.records, results.config
    thresholds = gate_thresholds(config.defenses or [])

    def write_csv(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            rows = [r.to_json() for r in records]
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(out / "report.csv", write_csv)
    plots = [plot_accuracy(records, out), *plot_gate_histograms(ResultsStore(out).batches(), thresholds, out)]
    settings = ", ".join(f"{k}: {getattr(config, k)}" for k in ("model", "pretrained", "prompts", "limit", "seed",
                                                                 "seeds") if getattr(config, k) is not None)
    images = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    warnings = warnings_of(records)
    warned = ("## Warnings\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n\n") if warnings else ""
    text = (f"# Evaluation report\n\n{settings}\n\n{_what_was_run(config, records)}\n\n{warned}"
            f"{paper_tables(records)}\n\n{claims_table(records)}\n\n{READING}\n\n## Plots\n\n{images}\n")
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [out / "report.md", out / "report.csv", *plots]
