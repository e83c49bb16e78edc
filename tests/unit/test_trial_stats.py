"""pass^k (tau-bench's unbiased estimator) and the Wilson interval, against hand-computed values and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.stats import pass_hat_k, percentile, wilson


@pytest.mark.parametrize(("c", "n", "k", "want"), [
    (3, 3, 3, 1.0), (2, 3, 3, 0.0), (0, 5, 1, 0.0), (3, 5, 1, 0.6),
    (2, 4, 2, 1 / 6),          # C(2,2)/C(4,2)
    (4, 6, 3, 4 / 20),         # C(4,3)/C(6,3)
    (9, 10, 5, 126 / 252),     # C(9,5)/C(10,5)
])
def test_pass_hat_k_known_values(c: int, n: int, k: int, want: float) -> None:
    assert pass_hat_k(c, n, k) == pytest.approx(want)


def test_pass_hat_k_undefined_with_fewer_trials_than_k_and_rejects_impossible_counts() -> None:
    assert pass_hat_k(2, 2, 3) is None and pass_hat_k(1, 1, 0) is None
    with pytest.raises(ValueError):
        pass_hat_k(4, 3, 1)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n), st.integers(1, n))))
def test_pass_hat_k_properties(cnk: tuple[int, int, int]) -> None:
    c, n, k = cnk
    p = pass_hat_k(c, n, k)
    assert p is not None and 0.0 <= p <= 1.0
    assert pass_hat_k(c, n, 1) == pytest.approx(c / n)
    if k > 1:  # all of k passing is never likelier than all of k-1
        assert p <= pass_hat_k(c, n, k - 1) + 1e-12  # type: ignore[operator]


@pytest.mark.parametrize(("c", "n", "lo", "hi"), [
    (0, 10, 0.0, 0.27753),     # Wilson 95 % for 0/10
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 3, 0.06149, 0.79234),
])
def test_wilson_known_values(c: int, n: int, lo: float, hi: float) -> None:
    got = wilson(c, n)
    assert got is not None
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_rate_and_stays_in_0_1(cn: tuple[int, int]) -> None:
    c, n = cn
    lo, hi = wilson(c, n)  # type: ignore[misc]
    assert 0.0 <= lo <= c / n <= hi <= 1.0
    assert wilson(0, 0) is None


def test_percentile_nearest_rank() -> None:
    assert percentile([], 95) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert math.isclose(percentile([0.5], 95) or 0, 0.5)
