"""Repeated-trial statistics: pass rate with a Wilson interval, and pass^k.

pass^k is the probability that k independent trials of a scenario all pass, estimated from
n trials with c passes without bias as C(c, k) / C(n, k) (Yao et al., tau-bench, 2024). The
interval on the pass rate is Wilson's score interval (95 % by default), which stays inside
[0, 1] and is sensible for small n and for c = 0 or c = n, unlike the normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def pass_hat_k(c: int, n: int, k: int) -> float | None:
    """C(c, k) / C(n, k); None when fewer than k trials were judged (or k < 1)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if k < 1 or n < k:
        return None
    return math.comb(c, k) / math.comb(n, k)


def wilson(c: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion c/n; None for n = 0."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if n == 0:
        return None
    p = c / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exactly 0 and 1 at c = 0 and c = n (the formula's value there, without rounding error)
    return (0.0 if c == 0 else max(0.0, centre - half)), (1.0 if c == n else min(1.0, centre + half))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
