import statistics

import numpy as np
import pytest

from counterattack.calibration import flagged_fraction, pareto_front, roc_auc, threshold_at_fpr
from counterattack.plots import plot_pareto, plot_score_histograms
from counterattack.stats import mean_and_std

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _brute_force_auc(clean, adv) -> float:
    wins = sum(1.0 if a > c else 0.5 if a == c else 0.0 for a in adv for c in clean)
    return wins / (len(clean) * len(adv))


def test_roc_auc_extremes():
    assert roc_auc([0.1, 0.2, 0.3], [0.5, 0.6]) == 1.0
    assert roc_auc([0.5, 0.6], [0.1, 0.2, 0.3]) == 0.0
    same = np.random.default_rng(0).normal(size=50).tolist()
    assert roc_auc(same, same) == 0.5
    assert roc_auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5


def test_roc_auc_hand_computed_with_a_tie():
    clean, adv = [0.1, 0.4, 0.35, 0.8], [0.9, 0.4, 0.65]
    # adv 0.9 beats all four; adv 0.4 beats 0.1 and 0.35, ties 0.4, loses to 0.8; adv 0.65 beats three.
    expected = (4 + (2 + 0.5) + 3) / 12
    assert roc_auc(clean, adv) == pytest.approx(expected)


def test_roc_auc_matches_pair_count_on_random_data():
    rng = np.random.default_rng(1)
    # Rounding makes many ties, the hard case for the rank formula.
    clean = np.round(rng.normal(0.0, 1.0, 157), 1).tolist()
    adv = np.round(rng.normal(0.7, 1.0, 83), 1).tolist()
    assert roc_auc(clean, adv) == pytest.approx(_brute_force_auc(clean, adv), abs=1e-12)
    assert 0.6 < roc_auc(clean, adv) < 0.9


def test_roc_auc_rejects_empty_sides():
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        roc_auc([1.0], [])


@pytest.mark.parametrize("flagged_above", [False, True])
def test_threshold_at_fpr_flags_exactly_k(flagged_above):
    clean = np.random.default_rng(2).normal(0.2, 0.05, 200)
    t = threshold_at_fpr(clean.tolist(), 0.05, flagged_above)
    flagged = (clean > t) if flagged_above else (clean < t)
    assert flagged.sum() == 10
    assert flagged_fraction(clean.tolist(), t, flagged_above) == pytest.approx(0.05)
    # Halfway between the 10th and 11th most extreme scores on the flagged side.
    ordered = np.sort(clean)[::-1] if flagged_above else np.sort(clean)
    assert t == pytest.approx((ordered[9] + ordered[10]) / 2)

    none = threshold_at_fpr(clean.tolist(), 0.0, flagged_above)
    assert flagged_fraction(clean.tolist(), none, flagged_above) == 0.0
    assert (none > clean.max()) if flagged_above else (none < clean.min())
    every = threshold_at_fpr(clean.tolist(), 1.0, flagged_above)
    assert flagged_fraction(clean.tolist(), every, flagged_above) == 1.0


def test_threshold_at_fpr_survives_float_error_in_the_target():
    clean = list(range(100))
    # 0.29 * 100 == 28.999999999999996 in floats.
    assert flagged_fraction(clean, threshold_at_fpr(clean, 0.29, False), False) == pytest.approx(0.29)
    assert flagged_fraction(clean, threshold_at_fpr(clean, 0.29, True), True) == pytest.approx(0.29)


def test_threshold_at_fpr_with_ties_flags_the_largest_achievable_count():
    clean = [1.0, 1.0, 1.0, 2.0, 3.0]
    # Two of five wanted, but the three 1.0s go together: none is the best below two.
    assert flagged_fraction(clean, threshold_at_fpr(clean, 0.4, False), False) == 0.0
    assert flagged_fraction(clean, threshold_at_fpr(clean, 0.8, False), False) == 0.8
    assert threshold_at_fpr(clean, 0.8, False) == 2.5
    assert flagged_fraction(clean, threshold_at_fpr(clean, 0.4, True), True) == 0.4
    assert flagged_fraction(clean, threshold_at_fpr(clean, 0.6, True), True) == 0.4
    mirrored = [-v for v in clean]
    assert flagged_fraction(mirrored, threshold_at_fpr(mirrored, 0.4, True), True) == 0.0


def test_threshold_at_fpr_rejects_bad_input():
    with pytest.raises(ValueError):
        threshold_at_fpr([], 0.05, False)
    with pytest.raises(ValueError):
        threshold_at_fpr([1.0, 2.0], 1.5, False)
    with pytest.raises(ValueError):
        threshold_at_fpr([1.0, 2.0], -0.1, True)


def test_pareto_front_hand_made():
    points = [(50, 10), (40, 20), (45, 5), (50, 10), (30, 20), (60, 0), (55, 0), (50, 8)]
    # (45, 5) and (50, 8) lose to (50, 10); (30, 20) to (40, 20); (55, 0) to (60, 0); both (50, 10) stay.
    assert pareto_front(points) == [1, 0, 3, 5]
    assert pareto_front([(70.0, 1.0)]) == [0]
    assert pareto_front([]) == []


def test_pareto_front_matches_brute_force_on_random_points():
    rng = np.random.default_rng(3)
    points = [tuple(p) for p in rng.integers(0, 12, size=(60, 2)).astype(float)]

    def dominated(i):
        return any(q[0] >= points[i][0] and q[1] >= points[i][1] and q != points[i] for q in points)

    expected = sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], i))
    assert pareto_front(points) == expected


def test_mean_and_std():
    values = np.random.default_rng(4).normal(30.0, 2.0, 7).tolist()
    mean, std = mean_and_std(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_and_std([42.5]) == (42.5, None)
    with pytest.raises(ValueError):
        mean_and_std([])


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("flagged_above, chosen", [(False, 0.15), (True, None)])
def test_plot_score_histograms_writes_a_png(tmp_path, flagged_above, chosen):
    rng = np.random.default_rng(5)
    clean, adv = rng.normal(0.25, 0.05, 300).tolist(), rng.normal(0.05, 0.03, 300).tolist()
    path = plot_score_histograms(clean, adv, 0.2, chosen, flagged_above, "tau on CIFAR-10",
                                 tmp_path / "plots" / f"hist_{flagged_above}.png")
    assert path == tmp_path / "plots" / f"hist_{flagged_above}.png"
    assert _is_png(path)


def test_plot_pareto_writes_a_png(tmp_path):
    points = [
        {"label": "ttc tau=0.2", "clean_acc": 80.0, "robust_acc": 20.0, "clean_ci95": (77.0, 83.0),
         "robust_ci95": (17.0, 23.5)},
        {"label": "ttc tau=0.3", "clean_acc": 75.0, "robust_acc": 30.0, "clean_ci95": (72.0, 78.0),
         "robust_ci95": (27.0, 33.0)},
        {"label": "mac", "clean_acc": 70.0, "robust_acc": 25.0, "n": 500},
        {"label": "doc", "clean_acc": 82.0, "robust_acc": 10.0},
    ]
    baseline = {"clean_acc": 88.0, "robust_acc": 0.0, "clean_ci95": (85.0, 90.5), "robust_ci95": (0.0, 0.8)}
    path = plot_pareto(points, tmp_path / "pareto.png", baseline=baseline)
    assert path == tmp_path / "pareto.png"
    assert _is_png(path)
    assert _is_png(plot_pareto(points[:1], tmp_path / "single.png"))
    with pytest.raises(ValueError):
        plot_pareto([], tmp_path / "empty.png")
