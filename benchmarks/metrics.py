"""Continual-learning metrics from accuracy matrices, and their summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "average_incremental_accuracy",
    "average_forgetting",
    "mean_std",
    "format_mean_std",
]


def average_incremental_accuracy(accuracy_per_step: Sequence[float]) -> float:
    """Mean over experiences ``t`` of the accuracy on all classes seen up to ``t``.

    The first experience is included, as in iCaRL and the paper.
    """
    if len(accuracy_per_step) == 0:
        raise ValueError("accuracy_per_step is empty")
    return sum(accuracy_per_step) / len(accuracy_per_step)


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Average forgetting of the experiences before the last.

    ``matrix[t][j]`` is the accuracy on the test data of experience ``j`` after
    training on experience ``t`` (defined for ``j <= t``). For each ``j < T-1``
    the forgetting is the best accuracy it had before the last experience
    minus its final accuracy; the result is their mean (0 with one experience).
    """
    n = len(matrix)
    for t, row in enumerate(matrix):
        if len(row) < t + 1:
            raise ValueError(f"row {t} of the accuracy matrix needs {t + 1} entries")
    if n < 2:
        return 0.0
    drops = [
        max(matrix[t][j] for t in range(j, n - 1)) - matrix[n - 1][j]
        for j in range(n - 1)
    ]
    return sum(drops) / len(drops)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± std"`` of ``values`` with ``digits`` decimals."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
