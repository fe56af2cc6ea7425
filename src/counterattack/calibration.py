"""Calibrating a defense's gate and comparing defense settings: detection AUC, the threshold at a
target false-positive rate, the clean/robust Pareto front, and their plots.

The gates of the test-time defenses decide per image whether to counterattack from one score:
TTC, DOC and CSR flag an image when its score is *below* the threshold (TTC's "falsely stable"
adversarial images have a small tau), MAC when it is *above*. Every function here takes that
direction explicitly (``flagged_above``) or, for the AUC, expects higher = "more likely adversarial"
(negate the scores of a gate that flags low values).

Everything but the two plots is a pure function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion, in percent (95% by default): unlike the normal
    approximation it stays inside [0, 100] and is sensible at 0 or n successes."""
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))



def _finite_array(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what}: no scores")
    if np.isnan(array).any():
        raise ValueError(f"{what}: NaN among the scores")
    return array


def roc_auc(clean_scores: Sequence[float], adversarial_scores: Sequence[float]) -> float:
    """The area under the ROC curve of a score as a detector of adversarial images.

    Convention: a HIGHER score means "more likely adversarial"; for a gate that flags low values
    (TTC's tau) pass the negated scores. The AUC equals P(adv > clean) + 0.5 P(adv == clean) over
    all (clean, adversarial) pairs (the Mann-Whitney U statistic divided by the number of pairs),
    computed in O(n log n) from the ranks of the pooled scores, tied scores sharing their average
    rank. 1.0: every adversarial image scores above every clean one; 0.5: no better than chance.

    Raises ValueError if either side is empty or holds a NaN.
    """
    clean = _finite_array(clean_scores, "clean scores")
    adv = _finite_array(adversarial_scores, "adversarial scores")
    pooled = np.concatenate([clean, adv])
    _, group, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # Ranks from 1; a group of t equal scores starting at rank r shares rank r + (t - 1) / 2.
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[group.reshape(-1)]
    n_clean, n_adv = clean.size, adv.size
    u_adv = ranks[n_clean:].sum() - n_adv * (n_adv + 1) / 2.0
    return float(u_adv / (n_clean * n_adv))


def flagged_fraction(scores: Sequence[float], threshold: float, flagged_above: bool) -> float:
    """The fraction of ``scores`` a gate with this threshold flags: ``score > threshold`` if
    ``flagged_above`` (MAC), else ``score < threshold`` (TTC, DOC, CSR). Strict in both directions,
    as in the gates; a score equal to the threshold is not flagged."""
    array = _finite_array(scores, "scores")
    flagged = array > threshold if flagged_above else array < threshold
    return float(flagged.mean())


def _threshold_flagging_lowest(sorted_scores: np.ndarray, k: int) -> float:
    """A threshold t such that ``score < t`` flags the largest count <= k of ``sorted_scores``
    (ascending) that ties allow."""
    n = sorted_scores.size
    # Only counts j with sorted[j - 1] < sorted[j] are achievable (and 0 and n): step back over ties.
    j = k
    while 0 < j < n and sorted_scores[j - 1] == sorted_scores[j]:
        j -= 1
    if j == 0 or j == n:
        extreme = sorted_scores[0] if j == 0 else sorted_scores[-1]
        span = sorted_scores[-1] - sorted_scores[0]
        margin = 1e-6 * max(1.0, abs(extreme), span)
        return float(extreme - margin if j == 0 else extreme + margin)
    below, above = sorted_scores[j - 1], sorted_scores[j]
    middle = (below + above) / 2.0
    # Two adjacent floats have no midpoint strictly between them: the upper one still works.
    return float(middle if middle > below else above)


def threshold_at_fpr(clean_scores: Sequence[float], target_fpr: float, flagged_above: bool) -> float:
    """The gate threshold whose false-positive rate on ``clean_scores`` is the largest not above
    ``target_fpr``: the fraction of clean images the gate would counterattack for nothing.

    Gate convention (see ``flagged_fraction``): with ``flagged_above=False`` an image is flagged when
    ``score < t`` (TTC, DOC, CSR), with ``flagged_above=True`` when ``score > t`` (MAC).

    With n clean scores, k = floor(target_fpr * n) of them are to be flagged (a tolerance of 1e-9
    absorbs float error, so 0.29 * 100 gives 29, not 28). The threshold lies halfway between the
    k-th and (k+1)-th most extreme clean scores on the flagged side, so that it sits as far from
    both as the clean sample allows. At k = 0 it lies just beyond the most extreme score on the
    flagged side (min - margin when flagging low values, max + margin when flagging high), at k = n
    just beyond the other end; the margin is 1e-6 * max(1, |that score|, range of the scores).

    Tied scores are flagged all or none, so exactly k may be impossible: then the threshold flags
    the largest achievable count below k (possibly 0). ``flagged_fraction(clean_scores, t,
    flagged_above) <= target_fpr`` always holds, up to the tolerance above.

    Raises ValueError if ``clean_scores`` is empty or holds a NaN, or if ``target_fpr`` is outside [0, 1].
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must lie in [0, 1], got {target_fpr}")
    scores = _finite_array(clean_scores, "clean scores")
    k = min(scores.size, math.floor(target_fpr * scores.size + 1e-9))
    if flagged_above:
        # score > t  <=>  -score < -t; negation is exact, so the two directions mirror each other.
        return -_threshold_flagging_lowest(np.sort(-scores), k)
    return _threshold_flagging_lowest(np.sort(scores), k)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """The indices of the points no other point dominates, maximising both coordinates (clean
    accuracy, robust accuracy): a point is dominated when another is at least as good in both and
    strictly better in one.

    Identical points do not dominate each other, so all copies of a point on the front are kept.
    The indices come in increasing order of the first coordinate (so decreasing second coordinate),
    copies in index order. O(n log n). Raises ValueError on NaN.
    """
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.empty((0, 2))
    if np.isnan(xy).any():
        raise ValueError("NaN among the points")
    # Sweep from the largest first coordinate down, tracking the best second coordinate seen at a
    # strictly larger first coordinate; points sharing a first coordinate are decided together.
    order = sorted(range(len(xy)), key=lambda i: (-xy[i, 0], -xy[i, 1], i))
    front: list[int] = []
    best_y = -math.inf
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and xy[order[end], 0] == xy[order[start], 0]:
            end += 1
        top_y = xy[order[start], 1]
        if top_y > best_y:
            front += [i for i in order[start:end] if xy[i, 1] == top_y]
        best_y = max(best_y, top_y)
        start = end
    return sorted(front, key=lambda i: (xy[i, 0], i))


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the SAMPLE standard deviation (ddof=1: the spread of repeated runs, e.g. over
    seeds, estimates a population's); the standard deviation is None for a single value, which
    says nothing about spread. Raises ValueError if ``values`` is empty."""
    data = [float(v) for v in values]
    if not data:
        raise ValueError("mean_and_std of no values")
    mean = math.fsum(data) / len(data)
    if len(data) == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in data) / (len(data) - 1))


def _flagged_label(name: str, scores: np.ndarray, threshold: float, flagged_above: bool) -> str:
    flagged = int((scores > threshold).sum() if flagged_above else (scores < threshold).sum())
    low, high = wilson_interval(flagged, scores.size)
    return f"{name} (n={scores.size}): flagged {100.0 * flagged / scores.size:.1f}% [{low:.1f}, {high:.1f}]"


def plot_score_histograms(
    clean_scores: Sequence[float], adversarial_scores: Sequence[float], threshold: float,
    chosen: float | None, flagged_above: bool, title: str, path: Path,
) -> Path:
    """Overlaid density histograms (shared bins) of a gate's score on clean and adversarial images,
    the current threshold (solid) and a chosen one (dashed, if given), which side the gate flags,
    and the detection AUC. The legend gives the fraction of each side flagged at the current
    threshold with its 95% Wilson interval. Writes a PNG to ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = _finite_array(clean_scores, "clean scores")
    adv = _finite_array(adversarial_scores, "adversarial scores")
    auc = roc_auc(clean, adv) if flagged_above else roc_auc(-clean, -adv)
    # The thresholds are always in view, even far from the scores.
    marks = [threshold] + ([chosen] if chosen is not None else [])
    values = np.concatenate([clean, adv, np.asarray(marks, dtype=np.float64)])
    values = values[np.isfinite(values)]
    low, high = float(values.min()), float(values.max())
    span = (low, high) if high > low else (low - 0.5, low + 0.5)
    bins = np.linspace(span[0], span[1], 61)

    fig, ax = plt.subplots(figsize=(9.6, 3.8))
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
    ax.set_xlabel("gate score")
    ax.set_ylabel("density")
    ax.set_title(f"{title} (AUC {auc:.3f})")
    # Outside the axes: inside, it would cover the thresholds or the arrow.
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
    ax.annotate(point["label"], (x, y), xytext=(3, 3), textcoords="offset points", **(label_style or {"fontsize": "x-small"}))


def plot_pareto(points: Sequence[dict], path: Path, baseline: dict | None = None, title: str | None = None) -> Path:
    """Clean against robust accuracy of defense settings, with their 95% intervals as error bars
    (``clean_ci95``/``robust_ci95``; derived from ``n`` when only that is given) and the Pareto
    front of ``points`` as a staircase (the edge of what the settings reach). ``baseline``, the
    undefended model, is marked apart as "no defense" and does not enter the front. Each dict
    has ``label``, ``clean_acc`` and ``robust_acc`` in percent. Writes a PNG to ``path``, returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("plot_pareto needs at least one point")
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
