"""A comparison with published numbers, written: comparison.md, .csv, .json and .png beside a run's results.

``compare.compare_results`` matches; this module says what it found, in words, tables and a figure.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .compare import MATCHING_RULE, OUTPUT_NAMES, Comparison, compare_results
from .plots import plot_comparison
from .published import Published, load_published
from .records import Results
from .store import write_atomically


# ---- writing ---------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _ours(value: float, interval: tuple[float, float] | None) -> str:
    return f"{value:.2f}" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def comparison_markdown(comparison: Comparison, folder: Path | None = None, seeds: Sequence[int] | None = None) -> str:
    """The comparison as Markdown: what was compared and how, one table per source, averages, records without a twin."""
    where = f" from `{folder / 'results.json'}`" if folder is not None else ""
    over = f", mean over seeds {', '.join(map(str, seeds))}" if seeds else ""
    twins = comparison.records - len(comparison.unmatched)
    parts = [
        "# Comparison with published numbers",
        f"Run{where}: model `{comparison.model}`, backbone `{comparison.backbone or 'unknown'}`{over}. "
        f"{twins} of {comparison.records} records have a published twin ({len(comparison.rows)} rows); "
        f"{len(comparison.unmatched)} {'has' if len(comparison.unmatched) == 1 else 'have'} none.",
        f"Matching rule: {MATCHING_RULE}. Defense and attack options other than the budget are not matched on; "
        "where ours differ from this library's defaults (which follow the papers), the row's notes say so.",
        "Columns: ours with its 95% interval (Wilson, over the run's images); published as printed "
        "(\"-\": not printed); "
        "diff = ours - published, in points; in = the published value lies inside our interval. "
        "Budgets in 1/255.",
    ]
    if comparison.sources:
        parts.append("Sources:\n\n" + "\n".join(f"- `{s.key}`: {s.label}. {s.cite}." for s in comparison.sources))
    if not comparison.rows:
        parts.append("**Nothing matched**: no record of this run has a published twin under the rule above "
                     "(each record's reason is listed below).")
    header = ["dataset", "defense", "attack", "eps", "steps", "n", "clean ours [95%]", "clean published", "diff", "in",
              "robust ours [95%]", "robust published", "diff", "in"]
    for source in comparison.sources:
        rows = [r for r in comparison.rows if r.source == source.key]
        if not rows:
            continue
        cells = [[r.dataset, r.defense, r.attack, f"{r.eps:g}", str(r.steps), str(r.n or "-"),
                  _ours(r.ours_clean, r.clean_ci95), _num(r.published_clean), _num(r.clean_diff, sign=True),
                  _flag(r.clean_inside), _ours(r.ours_robust, r.robust_ci95), _num(r.published_robust),
                  _num(r.robust_diff, sign=True), _flag(r.robust_inside)] for r in rows]
        notes = [f"- {r.dataset} {r.defense} {r.attack}: {'; '.join(r.notes)}" for r in rows if r.notes]
        parts.append(f"## {source.label}: `{source.key}`\n\n{_table(header, cells)}"
                     + ("\n\nOur options that differ from the defaults:\n\n" + "\n".join(notes) if notes else ""))
    if comparison.averages:
        cells = [[a.source_label, a.scope, a.defense, a.attack, f"{a.eps:g}", str(a.steps),
                  f"{len(a.datasets)} of {a.scope_size}",
                  _num(a.ours_clean), _num(a.published_clean), _num(a.clean_diff, sign=True), _num(a.ours_robust),
                  _num(a.published_robust), _num(a.robust_diff, sign=True),
                  f"{_num(a.published_same_clean)} / {_num(a.published_same_robust)}", a.note or "the published scope"]
                 for a in comparison.averages]
        parts.append(
            "## Averages\n\nOur mean of per-dataset accuracies over the datasets run of each published average's set. "
            "No interval is given for a mean over datasets. Where fewer datasets were run than the source averaged, "
            "the row says so, and \"same datasets\" is the source's own per-dataset numbers averaged over ours "
            "(\"-\" where it did not print them all).\n\n"
            + _table(["source", "average", "defense", "attack", "eps", "steps", "datasets", "clean ours",
                      "clean published", "diff", "robust ours", "robust published", "diff",
                      "same datasets (clean / robust)", "scope"], cells))
    if comparison.unmatched:
        cells = [[u.dataset, u.defense, u.attack, str(u.threat), "-" if u.eps is None else f"{u.eps:.4g}",
                  "-" if u.steps is None else str(u.steps), u.reason] for u in comparison.unmatched]
        parts.append("## Records without a published twin\n\n"
                     + _table(["dataset", "defense", "attack", "threat", "eps", "steps", "why"], cells))
    return "\n\n".join(parts) + "\n"


CSV_FIELDS = ("kind", "source", "source_label", "dataset", "defense", "attack", "eps_255", "steps", "n", "ours_clean",
              "ours_clean_low", "ours_clean_high", "published_clean", "clean_diff", "clean_inside", "ours_robust",
              "ours_robust_low", "ours_robust_high", "published_robust", "robust_diff", "robust_inside", "datasets",
              "published_same_clean", "published_same_robust", "note")


def comparison_csv(comparison: Comparison) -> str:
    """One line per row ("dataset"), average ("average") and record without a twin ("no twin")."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, restval="")
    writer.writeheader()
    for r in comparison.rows:
        writer.writerow({
            "kind": "dataset", "source": r.source, "source_label": r.source_label, "dataset": r.dataset,
            "defense": r.defense, "attack": r.attack, "eps_255": r.eps, "steps": r.steps, "n": r.n,
            "ours_clean": r.ours_clean, "ours_clean_low": r.clean_ci95[0] if r.clean_ci95 else "",
            "ours_clean_high": r.clean_ci95[1] if r.clean_ci95 else "", "published_clean": r.published_clean,
            "clean_diff": r.clean_diff, "clean_inside": r.clean_inside, "ours_robust": r.ours_robust,
            "ours_robust_low": r.robust_ci95[0] if r.robust_ci95 else "",
            "ours_robust_high": r.robust_ci95[1] if r.robust_ci95 else "", "published_robust": r.published_robust,
            "robust_diff": r.robust_diff, "robust_inside": r.robust_inside, "note": "; ".join(r.notes)})
    for a in comparison.averages:
        writer.writerow({
            "kind": "average", "source": a.source, "source_label": a.source_label, "dataset": a.scope,
            "defense": a.defense, "attack": a.attack, "eps_255": a.eps, "steps": a.steps, "ours_clean": a.ours_clean,
            "published_clean": a.published_clean, "clean_diff": a.clean_diff, "ours_robust": a.ours_robust,
            "published_robust": a.published_robust, "robust_diff": a.robust_diff, "datasets": " ".join(a.datasets),
            "published_same_clean": a.published_same_clean, "published_same_robust": a.published_same_robust,
            "note": a.note})
    for u in comparison.unmatched:
        writer.writerow({"kind": "no twin", "dataset": u.dataset, "defense": u.defense, "attack": u.attack,
                         "eps_255": u.eps, "steps": u.steps, "note": u.reason})
    return out.getvalue()


def comparison_json(comparison: Comparison) -> dict:
    """The comparison as plain JSON data, sources cited with their labels."""
    return {"model": comparison.model, "backbone": comparison.backbone, "matching": MATCHING_RULE,
            "records": comparison.records,
            "sources": {s.key: {"label": s.label, "cite": s.cite, "primary": s.primary} for s in comparison.sources},
            "rows": [asdict(r) for r in comparison.rows], "averages": [asdict(a) for a in comparison.averages],
            "unmatched": [asdict(u) for u in comparison.unmatched]}


def write_comparison(folder: Path, published: Published | None = None) -> list[Path]:
    """Compare a run folder's results.json with the published numbers: write comparison.md, .csv, .json and
    .png into the folder (each atomically) and return their paths. ``published``: the package's data if None."""
    folder = Path(folder)
    results = Results.read(folder)
    published = published if published is not None else load_published()
    comparison = compare_results(results, published)
    md, csv_path, json_path, png = (folder / name for name in OUTPUT_NAMES)
    seeds = results.config.seeds
    text = comparison_markdown(comparison, folder, seeds if isinstance(seeds, list) else None)
    write_atomically(md, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    table = comparison_csv(comparison)
    write_atomically(csv_path, lambda tmp: tmp.write_text(table, encoding="utf-8", newline=""))
    payload = json.dumps(comparison_json(comparison), indent=2) + "\n"
    write_atomically(json_path, lambda tmp: tmp.write_text(payload, encoding="utf-8"))
    plot_comparison(comparison, png)
    return [md, csv_path, json_path, png]
