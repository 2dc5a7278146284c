"""The population stability index on samples whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fraudflow.eval.drift import PSI_MAJOR, PSI_MODERATE, population_stability_index, quantile_edges


def test_identical_samples_give_zero() -> None:
    x = np.random.default_rng(0).normal(size=5_000)
    assert population_stability_index(x, x) == pytest.approx(0.0, abs=1e-12)


def test_two_samples_of_one_distribution_are_stable() -> None:
    rng = np.random.default_rng(1)
    reference, recent = rng.normal(size=50_000), rng.normal(size=50_000)
    assert population_stability_index(reference, recent) < 0.01 < PSI_MODERATE


def test_hand_computed_two_bins() -> None:
    # Reference 1, 2, 3, 4: the one inner edge is the median 2.5, shares 1/2, 1/2.
    # Recent 1, 1, 1, 4: shares 3/4 (<= 2.5), 1/4.
    # PSI = (3/4 - 1/2) ln(3/2) + (1/4 - 1/2) ln(1/2) = 0.25 ln 1.5 + 0.25 ln 2 = 0.274653...
    psi = population_stability_index([1, 2, 3, 4], [1, 1, 1, 4], bins=2)
    assert psi == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2.0), abs=1e-12)
    assert psi == pytest.approx(0.274653, abs=1e-6)


def test_a_shift_of_one_standard_deviation_is_major() -> None:
    rng = np.random.default_rng(2)
    reference, shifted = rng.normal(size=20_000), rng.normal(loc=1.0, size=20_000)
    assert population_stability_index(reference, shifted) > PSI_MAJOR


def test_ties_merge_repeated_edges_and_empty_bins_use_eps() -> None:
    # Sorted reference 0,0,0,0,0,1,2,3,4,5; linear quantiles at 0.2, 0.4, 0.6, 0.8 are
    # 0, 0, 1.4, 3.2, so the edges are 0, 1.4, 3.2: bins (-inf, 0], (0, 1.4], (1.4, 3.2],
    # (3.2, inf) with shares 0.5, 0.1, 0.2, 0.2.
    reference = [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(quantile_edges(reference, bins=5), [0.0, 1.4, 3.2])
    # Recent all zero: shares 1, 0, 0, 0; the empty ones are floored at eps = 1e-4.
    eps = 1e-4
    expected = (1 - 0.5) * math.log(1 / 0.5)
    expected += (eps - 0.1) * math.log(eps / 0.1) + 2 * (eps - 0.2) * math.log(eps / 0.2)
    psi = population_stability_index(reference, [0] * 10, bins=5, eps=eps)
    assert psi == pytest.approx(expected, rel=1e-12)


def test_values_beyond_the_reference_range_land_in_the_end_bins() -> None:
    reference = np.arange(100, dtype=float)
    assert population_stability_index(reference, reference + 1_000) == pytest.approx(
        population_stability_index(reference, np.full(100, 99.0))
    )


def test_empty_or_nan_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="recent sample must not be empty"):
        population_stability_index([1.0, 2.0], [])
    with pytest.raises(ValueError, match="reference sample must hold no NaN, however 1 do"):
        population_stability_index([1.0, float("nan")], [1.0])
