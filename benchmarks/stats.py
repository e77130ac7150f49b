"""Summary statistics of repeated timings: median and spread (min, max, quartiles, IQR).

Quartiles use linear interpolation between order statistics (numpy's default ``percentile``
method, ``statistics.quantiles(method="inclusive")``), so a list of one value has zero spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, linear interpolation."""
    if not sorted_values:
        raise ValueError("quantile of an empty list")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    position = q * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = position - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def summarize(values: Sequence[float]) -> dict:
    """``{n, median, min, max, q1, q3, iqr, mean, values}`` of a non-empty list of numbers."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("no values to summarize")
    q1, q3 = quantile(data, 0.25), quantile(data, 0.75)
    return {
        "n": len(data),
        "median": quantile(data, 0.5),
        "min": data[0],
        "max": data[-1],
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "mean": sum(data) / len(data),
        "values": [float(v) for v in values],  # in the order measured
    }
