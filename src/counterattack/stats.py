"""Statistics of runs: intervals of accuracies and the spread over repeated runs."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion, in percent (95% by default): unlike the normal
    approximation it stays inside [0, 100] and is sensible at 0 or n successes."""
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


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


def duration(seconds: float) -> str:
    """A time for a person: seconds, minutes or hours."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
