"""Calibrating a defense's gate and comparing defense settings: detection AUC, the threshold at a
target false-positive rate, the clean/robust Pareto front, and their plots.

The gates of the test-time defenses decide per image whether to counterattack from one score:
TTC, DOC and CSR flag an image when its score is *below* the threshold (TTC's "falsely stable"
adversarial images have a small tau), MAC when it is *above*. Every function here takes that
direction explicitly (``flagged_above``) or, for the AUC, expects higher = "more likely adversarial"
(negate the scores of a gate that flags low values).

Everything here is a pure function of its arguments; the plots are in ``plots``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def finite_scores(values: Sequence[float], what: str) -> np.ndarray:
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
    clean = finite_scores(clean_scores, "clean scores")
    adv = finite_scores(adversarial_scores, "adversarial scores")
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
    array = finite_scores(scores, "scores")
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
    scores = finite_scores(clean_scores, "clean scores")
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
