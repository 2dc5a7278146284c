"""Rich tables of run metrics, shared by `train`, `evaluate` and `demo`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

__all__ = ["METRIC_COLUMNS", "format_cell", "metrics_table"]

# (metrics.json key, column label, format): shared by every table of run metrics.
METRIC_COLUMNS = (
    ("roc_auc", "AUC", "{:.4f}"),
    ("average_precision", "AP", "{:.4f}"),
    ("card_precision_at_100", "CP@100", "{:.4f}"),
    ("recall_at_1pct_fpr", "R@1%FPR", "{:.4f}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("train_samples_per_second", "samples/s", "{:,.0f}"),
)


def format_cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def metrics_table(metrics: Sequence[dict[str, Any]], names: Sequence[str]) -> Table:
    table = Table(title="test-period metrics")
    table.add_column("run", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for _, label, _ in METRIC_COLUMNS:
        table.add_column(label, justify="right", no_wrap=True)
    for name, row in zip(names, metrics, strict=True):
        cells = [format_cell(row.get(key), fmt) for key, _, fmt in METRIC_COLUMNS]
        table.add_row(name, str(row.get("model", "?")), *cells)
    return table
