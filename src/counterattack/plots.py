"""Every figure the library draws: accuracy bars, gate-score histograms, Pareto fronts.

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved directly, never through
``pyplot``: a library must not switch its user's backend or leave figures open in it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .calibration import finite_scores, pareto_front, roc_auc
from .data import short_name
from .records import BatchRecord, Record

if TYPE_CHECKING:  # compare imports this module to draw its figure
    from .compare import Comparison
from .stats import wilson_interval
from .store import write_atomically
from .summary import WORST_CASE


def safe_file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def plot_gate_histograms(batches: Sequence[BatchRecord], thresholds: dict[str, float], out: Path) -> list[Path]:
    """Per dataset: a gate's score on clean vs adversarial images (TTC's "falsely stable" picture), for TTC if
    it ran, else the first gated defense (``thresholds``: each defense's threshold, from the configuration)."""
    scores: dict[str, dict] = {}
    for batch in batches:
        gated = sorted(batch.defenses.items(), key=lambda item: item[0] != "ttc")
        for name, result in gated:
            if result.clean.gate_scores() is not None:
                attack = next(iter(result.adv))
                entry = scores.setdefault(batch.dataset, {"defense": name, "attack": attack, "clean": [], "adv": [],
                                                          "score": result.gate_score or "tau"})
                if entry["defense"] == name:
                    entry["clean"] += result.clean.gate_scores()
                    entry["adv"] += result.adv[entry["attack"]].gate_scores()
    written = []
    for dataset, entry in scores.items():
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        # The threshold is always in view: whether the scores fall far from it is the story.
        threshold = thresholds.get(entry["defense"])
        values = entry["clean"] + entry["adv"] + ([threshold] if threshold is not None else [])
        span = (min(values), max(values)) if max(values) > min(values) else (min(values) - 0.5, min(values) + 0.5)
        ax.hist(entry["clean"], bins=60, range=span, alpha=0.6, label=f"clean (n={len(entry['clean'])})")
        ax.hist(entry["adv"], bins=60, range=span, alpha=0.6, label=f"adversarial ({entry['attack']})")
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold = {threshold:g}")
        ax.set_xlabel("tau = ||f(x + delta0) - f(x)|| / ||f(x)||" if entry["score"] == "tau"
                      else f"{entry['defense']}'s {entry['score']}")
        ax.set_ylabel("images")
        ax.set_title(f"{short_name(dataset)}: {entry['defense']}'s gate on clean vs adversarial images")
        ax.legend()
        fig.tight_layout()
        path = out / f"gate_hist_{safe_file_name(short_name(dataset))}.png"
        write_atomically(path, partial(fig.savefig, dpi=120, format="png"))
        written.append(path)
    return written


def _error_bars(by_key: dict[tuple[str, str], Record], datasets: Sequence[str], defense: str,
                kind: str) -> list[list[float]]:
    """Matplotlib's asymmetric error bars (below, above) from the records' 95% intervals."""
    below, above = [], []
    for dataset in datasets:
        record = by_key.get((dataset, defense))
        interval = None if record is None else getattr(record, f"{kind}_ci95")
        value = 0.0 if record is None else getattr(record, f"{kind}_acc")
        low, high = interval or (value, value)
        below.append(max(0.0, value - low))
        above.append(max(0.0, high - value))
    return [below, above]


def plot_accuracy(records: Sequence[Record], out: Path) -> Path:
    """``accuracy.png`` in ``out``: :func:`accuracy_figure`."""
    fig = accuracy_figure(records)
    path = out / "accuracy.png"
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def accuracy_figure(records: Sequence[Record]) -> Figure:
    """Grouped bars: per dataset, clean (light) and robust (dark) accuracy of each defense, robust under the run's
    one attack or, with several, their per-image worst case (named on the axis)."""
    attacks = list(dict.fromkeys(r.attack for r in records))
    shown = WORST_CASE if WORST_CASE in attacks else attacks[0]
    records = [r for r in records if r.attack == shown]
    datasets = list(dict.fromkeys(r.dataset for r in records))
    defenses = list(dict.fromkeys(r.defense for r in records))
    by_key = {(r.dataset, r.defense): r for r in records}
    width = 0.8 / len(defenses)
    fig = Figure(figsize=(max(6, 1.5 * len(datasets) * max(1, len(defenses) / 3)), 4))
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, defense in enumerate(defenses):
        xs = [i + (j - (len(defenses) - 1) / 2) * width for i in range(len(datasets))]
        clean = [by_key[(d, defense)].clean_acc if (d, defense) in by_key else 0 for d in datasets]
        robust = [by_key[(d, defense)].robust_acc if (d, defense) in by_key else 0 for d in datasets]
        color = colors[j % len(colors)]
        ax.bar(xs, clean, width, color=color, alpha=0.35, yerr=_error_bars(by_key, datasets, defense, "clean"),
               error_kw={"alpha": 0.5, "capsize": 2})
        ax.bar(xs, robust, width, color=color, label=defense, yerr=_error_bars(by_key, datasets, defense, "robust"),
               error_kw={"capsize": 2})
    ax.set_xticks(range(len(datasets)), [short_name(d) for d in datasets])
    ax.set_ylabel(f"accuracy (%): light clean, dark robust\nunder {shown} (bars: 95% Wilson intervals)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=min(len(defenses), 6), fontsize="small")
    fig.tight_layout()
    return fig


def _flagged_label(name: str, scores: np.ndarray, threshold: float, flagged_above: bool) -> str:
    flagged = int((scores > threshold).sum() if flagged_above else (scores < threshold).sum())
    low, high = wilson_interval(flagged, scores.size)
    return f"{name} (n={scores.size}): flagged {100.0 * flagged / scores.size:.1f}% [{low:.1f}, {high:.1f}]"


def plot_score_histograms(
    clean_scores: Sequence[float], adversarial_scores: Sequence[float], threshold: float,
    chosen: float | None, flagged_above: bool, title: str, path: Path, score: str = "gate score",
) -> Path:
    """Overlaid density histograms (shared bins) of a gate's score on clean and adversarial images,
    the current threshold (solid) and a chosen one (dashed, if given), which side the gate flags,
    and the detection AUC. The legend gives the fraction of each side flagged at the current
    threshold with its 95% Wilson interval. Writes a PNG to ``path`` and returns it."""
    clean = finite_scores(clean_scores, "clean scores")
    adv = finite_scores(adversarial_scores, "adversarial scores")
    auc = roc_auc(clean, adv) if flagged_above else roc_auc(-clean, -adv)
    # The thresholds are always in view, even far from the scores.
    marks = [threshold] + ([chosen] if chosen is not None else [])
    values = np.concatenate([clean, adv, np.asarray(marks, dtype=np.float64)])
    values = values[np.isfinite(values)]
    low, high = float(values.min()), float(values.max())
    span = (low, high) if high > low else (low - 0.5, low + 0.5)
    bins = np.linspace(span[0], span[1], 61)

    fig = Figure(figsize=(9.6, 3.8))
    ax = fig.subplots()
    ax.hist(clean, bins=bins, density=True, alpha=0.55, label=_flagged_label("clean", clean, threshold, flagged_above))
    ax.hist(adv, bins=bins, density=True, alpha=0.55,
            label=_flagged_label("adversarial", adv, threshold, flagged_above))
    ax.axvline(threshold, color="black", linestyle="-", label=f"threshold = {threshold:.4g}")
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen = {chosen:.4g}")
    # An arrow from the current threshold into the side the gate flags.
    top, width = ax.get_ylim()[1], span[1] - span[0]
    head = threshold + (0.12 if flagged_above else -0.12) * width
    ax.annotate("", xy=(head, 0.85 * top), xytext=(threshold, 0.85 * top),
                arrowprops={"arrowstyle": "->", "color": "black"})
    ax.text(head, 0.85 * top, " flagged (score > t)" if flagged_above else "flagged (score < t) ",
            ha="left" if flagged_above else "right", va="center", fontsize="small")
    ax.set_xlabel(score)
    ax.set_ylabel("density")
    ax.set_title(f"{title} (AUC {auc:.3f})")
    # Outside the axes: inside, it would cover the thresholds or the arrow.
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def _interval(point: dict, kind: str) -> tuple[float, float] | None:
    """A point's 95% interval of ``{kind}_acc`` in percent: given, or from its ``n`` if it has one."""
    interval = point.get(f"{kind}_ci95")
    if interval is None and point.get("n"):
        interval = wilson_interval(round(point[f"{kind}_acc"] * point["n"] / 100.0), point["n"])
    return None if interval is None else (float(interval[0]), float(interval[1]))


def _draw_point(ax, point: dict, label_style: dict | None = None, **style) -> None:
    x, y = point["clean_acc"], point["robust_acc"]
    xerr = yerr = None
    if (ci := _interval(point, "clean")) is not None:
        xerr = [[max(0.0, x - ci[0])], [max(0.0, ci[1] - x)]]
    if (ci := _interval(point, "robust")) is not None:
        yerr = [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
    ax.errorbar([x], [y], xerr=xerr, yerr=yerr, capsize=2, elinewidth=0.8, **style)
    ax.annotate(point["label"], (x, y), xytext=(3, 3), textcoords="offset points",
                **(label_style or {"fontsize": "x-small"}))


def plot_pareto(points: Sequence[dict], path: Path, baseline: dict | None = None, title: str | None = None) -> Path:
    """Clean against robust accuracy of defense settings, with their 95% intervals as error bars
    (``clean_ci95``/``robust_ci95``; derived from ``n`` when only that is given) and the Pareto
    front of ``points`` as a staircase (the edge of what the settings reach). ``baseline``, the
    undefended model, is marked apart as "no defense" and does not enter the front. Each dict
    has ``label``, ``clean_acc`` and ``robust_acc`` in percent. Writes a PNG to ``path``, returns it."""
    if not points:
        raise ValueError("plot_pareto needs at least one point")
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    on_front = pareto_front([(p["clean_acc"], p["robust_acc"]) for p in points])
    front = [points[i] for i in on_front]
    for i, point in enumerate(points):
        # Settings off the front are drawn and named faintly: the front is what a reader needs to read.
        faint = i not in on_front
        _draw_point(ax, point, fmt="o", color="tab:blue", markersize=4, alpha=0.35 if faint else 1.0,
                    label="defense settings" if i == 0 else None,
                    label_style={"fontsize": 6 if faint else "x-small", "color": "0.55" if faint else "black"})
    ax.step([p["clean_acc"] for p in front], [p["robust_acc"] for p in front], where="pre",
            color="tab:orange", zorder=1, label="Pareto front")
    if baseline is not None:
        _draw_point(ax, {**baseline, "label": "no defense"}, fmt="s", color="black", markersize=7,
                    markerfacecolor="none", label="no defense")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def plot_stability(rows: Sequence[dict], published: dict[float, tuple[float, float]], path: Path, title: str) -> Path:
    """The TTC paper's bar chart: mean tau of clean and adversarial images per uniform-noise budget (whiskers from
    the 25% to the 75% quantile), beside the poster's values (hatched) where it charted the dataset."""
    budgets = [r["noise_eps"] for r in rows]
    xs = np.arange(len(budgets))
    charted = [b for b in budgets if b in published]
    width = 0.2 if charted else 0.35
    fig = Figure(figsize=(max(5.5, 1.4 * len(budgets) + 2), 3.8))
    ax = fig.subplots()
    for offset, key, label, color in ((-1, "clean", "clean", "tab:blue"), (1, "adversarial", "adversarial", "tab:red")):
        means = [r[key]["mean"] for r in rows]
        below = [max(0.0, m - r[key]["quantiles"]["0.25"]) for m, r in zip(means, rows, strict=True)]
        above = [max(0.0, r[key]["quantiles"]["0.75"] - m) for m, r in zip(means, rows, strict=True)]
        shift = offset * width * (1.5 if charted else 0.5)
        ax.bar(xs + shift, means, width, color=color, label=f"{label} (ours)", yerr=[below, above], capsize=2)
        if charted:
            index = 0 if key == "clean" else 1
            poster = [published.get(b, (np.nan, np.nan))[index] for b in budgets]
            ax.bar(xs + offset * width * 0.5, poster, width, color="none", edgecolor=color, hatch="//",
                   label=f"{label} (TTC poster, ViT-B/32)")
    ax.set_xticks(xs, [f"{b:g}/255" for b in budgets])
    ax.set_xlabel("uniform noise budget")
    ax.set_ylabel("mean tau\n(whiskers: 25% to 75%)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """Ours (x) against published (y), clean and robust side by side, written atomically as a PNG.

    Drawn on a bare ``matplotlib.figure.Figure``: pyplot is never imported and the backend never set, so a
    caller's interactive session is left as it was.
    """
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12, 5.6), dpi=110)
    if not comparison.rows:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, f"No record of this run has a published twin ({comparison.records} records compared):\n"
                "nothing to plot. comparison.md lists each record's reason.", ha="center", va="center", fontsize=12)
    else:
        colours = {s.key: f"C{i}" for i, s in enumerate(comparison.sources)}
        defenses = list(dict.fromkeys(r.defense for r in comparison.rows))
        markers = {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(defenses)}
        for k, kind in enumerate(("clean", "robust")):
            ax = fig.add_subplot(1, 2, k + 1)
            values = []
            for r in comparison.rows:
                ours, theirs = getattr(r, f"ours_{kind}"), getattr(r, f"published_{kind}")
                ci = getattr(r, f"{kind}_ci95")
                if theirs is None:
                    continue
                xerr = [[max(0.0, ours - ci[0])], [max(0.0, ci[1] - ours)]] if ci else None
                ax.errorbar([ours], [theirs], xerr=xerr, fmt=markers[r.defense], color=colours[r.source], ms=6,
                            elinewidth=1, capsize=2, alpha=0.85)
                ax.annotate(r.dataset, (ours, theirs), xytext=(3, 3), textcoords="offset points", fontsize=6)
                values += [ours, theirs, *(ci or ())]
            low, high = (max(0.0, min(values) - 3), min(100.0, max(values) + 3)) if values else (0.0, 100.0)
            ax.plot([low, high], [low, high], color="0.5", lw=1, ls="--", zorder=0)
            ax.set_xlim(low, high)
            ax.set_ylim(low, high)
            ax.set_aspect("equal")
            ax.set_xlabel(f"ours: {kind} accuracy (%), 95% interval")
            ax.set_ylabel(f"published {kind} accuracy (%)")
            ax.set_title(f"{kind}" + ("" if values else ": no published value"))
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colours[s.key], marker="o", ls="", label=f"{s.key}: {s.label}")
                   for s in comparison.sources]
        handles += [Line2D([], [], color="0.3", marker=markers[d], ls="", label=d) for d in defenses]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
        fig.suptitle(f"{comparison.model} ({comparison.backbone}): ours against published, one point per dataset and "
                     "defense (dashed: equal)", fontsize=11)
        fig.subplots_adjust(bottom=0.22, top=0.9, wspace=0.25)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
