"""Evaluation: fraud metrics as pure functions, and the HTML report comparing runs."""

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

__all__ = [
    "PREDICTION_COLUMNS",
    "TABLE_COLUMNS",
    "Column",
    "RunResult",
    "average_precision",
    "best_values",
    "card_precision_at_k",
    "comparison_table",
    "compute_metrics",
    "drop_known_compromised",
    "load_run",
    "metrics_from_predictions",
    "recall_at_fpr",
    "roc_auc",
    "write_report",
]
