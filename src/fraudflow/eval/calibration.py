"""Score calibration: Platt scaling of a model's raw fraud scores, and how well calibrated
scores are.

Class-weighted training (``fraudflow.train.loop`` weighs frauds by the square root of the
imbalance) and boosting both distort probabilities: a raw score of 0.3 need not mean that 30%
of such transactions are fraud. The decision service promises a calibrated fraud probability,
so each run fits a calibrator on its validation period (never the test period, which must
stay unseen) and stores it in the model bundle.

Platt scaling (Platt 1999, "Probabilistic outputs for support vector machines and comparisons
to regularized likelihood methods"; applied to other models by Niculescu-Mizil & Caruana 2005,
"Predicting good probabilities with supervised learning") fits a logistic regression on one
input. Here the input is the logit of the raw score, so

    calibrated = sigmoid(a * logit(raw) + b)

which is the identity for a = 1, b = 0, and strictly increasing whenever a > 0: the ranking of
transactions, hence AUC, average precision and card precision, is unchanged (up to float64
resolution near 0 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression

__all__ = [
    "Calibrator",
    "ReliabilityBin",
    "calibration_summary",
    "expected_calibration_error",
    "fit_calibrator",
    "reliability_bins",
]

METHOD = "platt"
ECE_BINS = 10
# Scores of exactly 0 or 1 (a saturated float32 softmax) have an infinite logit: clip them.
# 1e-15 is the smallest margin that float64 still resolves below 1.
_CLIP = 1e-15


@dataclass(frozen=True)
class Calibrator:
    """Platt scaling on the logit of the raw score: ``sigmoid(a * logit(raw) + b)``."""

    a: float = 1.0
    b: float = 0.0

    def apply(self, scores: npt.ArrayLike) -> np.ndarray:
        """Calibrated fraud probabilities (N,) float64 for raw scores (N,) in [0, 1]."""
        return _sigmoid(self.a * _logit(np.asarray(scores, dtype=np.float64)) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibrator:
        if raw.get("method", METHOD) != METHOD:
            raise ValueError(f"calibration method must be {METHOD!r}, however: {raw['method']!r}")
        return cls(a=float(raw["a"]), b=float(raw["b"]))


def fit_calibrator(scores: npt.ArrayLike, labels: npt.ArrayLike) -> Calibrator:
    """Fit Platt scaling on raw scores (N,) and 0/1 labels (N,) of a held-out period.

    Targets are Platt's smoothed ones, 1 -> (N+ + 1) / (N+ + 2) and 0 -> 1 / (N- + 2)
    (Platt 1999, section 2.2; Lin, Lin & Weng 2007, "A note on Platt's probabilistic outputs
    for support vector machines"): a prior that keeps a and b finite even when the validation
    period separates perfectly, so no penalty is needed. scikit-learn takes no soft targets,
    so each row enters twice, once per class, weighted by its target. A slope a <= 0 would
    reverse or flatten the model's ranking; then the identity is returned instead.
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"calibration needs both classes, however: {n_pos} of {y.size} are 1")
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (y.size - n_pos + 2))
    x = np.concatenate([_logit(s), _logit(s)])[:, None]  # (2N, 1)
    classes = np.concatenate([np.ones_like(y), np.zeros_like(y)])  # (2N,)
    weights = np.concatenate([target, 1.0 - target])  # (2N,)
    model = LogisticRegression(C=np.inf, max_iter=1_000).fit(x, classes, sample_weight=weights)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    return Calibrator(a=a, b=b) if a > 0 else Calibrator()


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: scores in [low, high), the last bin closed."""

    low: float
    high: float
    count: int
    mean_score: float  # nan for an empty bin
    fraud_rate: float  # nan for an empty bin


def reliability_bins(
    labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = ECE_BINS
) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1]: how many scores fall in each, their mean, the fraud rate."""
    p, y = _scores_and_labels(probs, labels)
    index = _bin_index(p, bins)
    out = []
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        mean_score = float(p[mask].mean()) if count else float("nan")
        fraud_rate = float(y[mask].mean()) if count else float("nan")
        out.append(ReliabilityBin(i / bins, (i + 1) / bins, count, mean_score, fraud_rate))
    return out


def expected_calibration_error(
    labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = ECE_BINS
) -> float:
    """ECE = sum over bins b of (n_b / N) * |fraud rate in b - mean score in b|.

    Equal-width bins on [0, 1] (Naeini, Cooper & Hauskrecht 2015, "Obtaining well calibrated
    probabilities using Bayesian binning"; Guo et al. 2017, "On calibration of modern neural
    networks", eq. 3). ``nan`` for no rows.
    """
    table = reliability_bins(labels, probs, bins)
    total = sum(b.count for b in table)
    if total == 0:
        return float("nan")
    gaps = [b.count * abs(b.fraud_rate - b.mean_score) for b in table if b.count]
    return float(sum(gaps) / total)


def calibration_summary(
    labels: npt.ArrayLike, raw: npt.ArrayLike, calibrated: npt.ArrayLike, bins: int = ECE_BINS
) -> dict[str, float]:
    """ECE of the calibrated and of the raw scores, under the keys metrics.json uses."""
    return {
        "expected_calibration_error": expected_calibration_error(labels, calibrated, bins),
        "expected_calibration_error_raw": expected_calibration_error(labels, raw, bins),
    }


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    if bins < 1:
        raise ValueError(f"bins must be >= 1, however: bins={bins}")
    # A score of exactly 1.0 belongs to the last bin, not to a bin of its own.
    return np.minimum((p * bins).astype(np.int64), bins - 1)


def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, _CLIP, 1.0 - _CLIP)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp(-log(1 + exp(-z))): no overflow, and small probabilities keep their relative
    # precision (1 / (1 + exp(-z)) overflows for large negative z; a tanh form rounds to 0).
    return np.exp(-np.logaddexp(0.0, -z))


def _scores_and_labels(s: npt.ArrayLike, y: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s_arr = np.asarray(s, dtype=np.float64)
    y_arr = np.asarray(y).astype(np.int64, copy=False)
    if s_arr.shape != y_arr.shape or s_arr.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-d of the same length, however: {s_arr.shape} "
            f"and {y_arr.shape}"
        )
    if s_arr.size and (np.isnan(s_arr).any() or s_arr.min() < 0.0 or s_arr.max() > 1.0):
        raise ValueError("scores must be probabilities in [0, 1], however some are not")
    return s_arr, y_arr
