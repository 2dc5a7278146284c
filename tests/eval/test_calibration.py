"""Platt scaling on deliberately miscalibrated scores, and ECE on hand-built bins."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fraudflow.eval.calibration import (
    Calibrator,
    calibration_summary,
    expected_calibration_error,
    fit_calibrator,
    reliability_bins,
)
from fraudflow.eval.metrics import average_precision, roc_auc


def _cubed(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores s ~ U(0, 1) whose true fraud probability is s**3: s overstates it."""
    rng = np.random.default_rng(seed)
    s = rng.random(n)
    return s, (rng.random(n) < s**3).astype(np.int64)


def test_platt_reduces_ece_on_held_out_data_and_keeps_the_ranking() -> None:
    s_fit, y_fit = _cubed(0, 20_000)
    s_new, y_new = _cubed(1, 20_000)
    calibrator = fit_calibrator(s_fit, y_fit)
    calibrated = calibrator.apply(s_new)
    summary = calibration_summary(y_new, s_new, calibrated)
    # Raw: E|s - s^3| = 1/2 - 1/4 = 0.25 up to binning and noise.
    assert summary["expected_calibration_error_raw"] == pytest.approx(0.25, abs=0.02)
    assert summary["expected_calibration_error"] < 0.03
    assert summary["expected_calibration_error"] < summary["expected_calibration_error_raw"] / 5
    assert roc_auc(y_new, calibrated) == roc_auc(y_new, s_new)
    assert average_precision(y_new, calibrated) == average_precision(y_new, s_new)


def test_calibration_is_strictly_increasing_even_near_zero_and_one() -> None:
    calibrator = Calibrator(a=0.8, b=-2.0)
    raw = np.array([1e-12, 1e-9, 1e-6, 0.001, 0.1, 0.5, 0.9, 0.999, 1 - 1e-9])
    out = calibrator.apply(raw)
    assert np.all(np.diff(out) > 0)
    assert np.all((out > 0) & (out < 1))


def test_identity_and_round_trip_through_json() -> None:
    raw = np.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(Calibrator().apply(raw), raw, rtol=1e-12)
    calibrator = Calibrator(a=1.3, b=-0.7)
    again = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert again == calibrator
    assert calibrator.to_dict() == {"method": "platt", "a": 1.3, "b": -0.7}


def test_scores_of_exactly_zero_and_one_stay_finite() -> None:
    s = np.array([0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    calibrator = fit_calibrator(s, y)
    out = calibrator.apply(s)
    assert np.isfinite([calibrator.a, calibrator.b]).all() and np.isfinite(out).all()


def test_perfectly_separated_validation_keeps_finite_coefficients() -> None:
    # Platt's smoothed targets are what keeps a and b finite here.
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1])
    calibrator = fit_calibrator(s, y)
    assert 0 < calibrator.a < 100 and np.isfinite(calibrator.b)


def test_scores_that_rank_frauds_last_get_the_identity() -> None:
    s = np.linspace(0.05, 0.95, 200)
    y = (s < 0.3).astype(np.int64)  # the lower the score, the more fraud
    assert fit_calibrator(s, y) == Calibrator()


def test_single_class_is_refused() -> None:
    with pytest.raises(ValueError, match="needs both classes, however: 0 of 3 are 1"):
        fit_calibrator([0.1, 0.2, 0.3], [0, 0, 0])


def test_ece_and_reliability_bins_hand_built() -> None:
    # Bin 0 [0, 0.1): scores 0.05, 0.05, labels 0, 1 -> mean 0.05, rate 0.5, gap 0.45.
    # Bin 9 [0.9, 1.0]: scores 0.95 and exactly 1.0 (the last bin is closed), labels 1, 1
    # -> mean 0.975, rate 1.0, gap 0.025. ECE = (2 * 0.45 + 2 * 0.025) / 4 = 0.2375.
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 1.0])
    assert expected_calibration_error(y, p) == pytest.approx(0.2375, abs=1e-12)
    bins = reliability_bins(y, p)
    assert [b.count for b in bins] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert (bins[9].low, bins[9].high) == (0.9, 1.0)
    assert bins[9].mean_score == pytest.approx(0.975) and bins[9].fraud_rate == 1.0
    assert np.isnan(bins[1].mean_score)
