"""Evaluation: fraud metrics as pure functions, metrics per fraud scenario, score
calibration, drift, decision thresholds, and the HTML report comparing runs."""

from fraudflow.eval.calibration import (
    Calibrator,
    ReliabilityBin,
    calibration_summary,
    expected_calibration_error,
    fit_calibrator,
    reliability_bins,
)
from fraudflow.eval.drift import population_stability_index
from fraudflow.eval.metrics import (
    PREDICTION_COLUMNS,
    average_precision,
    card_precision_at_k,
    compute_metrics,
    drop_known_compromised,
    metrics_from_predictions,
    recall_at_fpr,
    roc_auc,
)
from fraudflow.eval.report import (
    TABLE_COLUMNS,
    Column,
    RunResult,
    best_values,
    comparison_table,
    load_run,
    write_report,
)
from fraudflow.eval.scenarios import REVIEW_BUDGET, per_scenario_metrics, scenario_metrics
from fraudflow.eval.thresholds import (
    PolicyCalibration,
    block_threshold,
    calibrate_policy,
    policy_document,
    policy_yaml,
    review_threshold,
)

__all__ = [
    "PREDICTION_COLUMNS",
    "REVIEW_BUDGET",
    "TABLE_COLUMNS",
    "Calibrator",
    "Column",
    "PolicyCalibration",
    "ReliabilityBin",
    "RunResult",
    "average_precision",
    "best_values",
    "block_threshold",
    "calibrate_policy",
    "calibration_summary",
    "card_precision_at_k",
    "comparison_table",
    "compute_metrics",
    "drop_known_compromised",
    "expected_calibration_error",
    "fit_calibrator",
    "load_run",
    "metrics_from_predictions",
    "per_scenario_metrics",
    "policy_document",
    "policy_yaml",
    "population_stability_index",
    "recall_at_fpr",
    "reliability_bins",
    "review_threshold",
    "roc_auc",
    "scenario_metrics",
    "write_report",
]
