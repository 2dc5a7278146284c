"""Metrics per fraud scenario, for logs that name each fraud's scenario (``fraud_scenario``).

The simulator names the scenario of every fraud (``fraudflow.data.simulator``), and so do logs
whose investigators record a fraud type. For each scenario with frauds among the evaluated test
rows (known-compromised cards left out, as for every metric), ``per_scenario_metrics`` gives:

    n_fraud                     the scenario's frauds
    recall_at_review_threshold  the share of them scored >= the run's review threshold
    average_precision           AP of the scenario's frauds against all legitimate rows, the
                                other scenarios' frauds left out: each scenario is scored as if
                                it were the only fraud, so scenarios compare with each other

Frauds with no scenario name ("" or null) count in no scenario. The review threshold is the
policy's (``fraudflow.eval.thresholds``): the lowest score at which the run's validation
period would have sent at most ``REVIEW_BUDGET`` cards a day to the analysts. Taken on
validation, never test, like the service's, so the recall is the one the service would see.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from fraudflow.data.schema import FRAUD_SCENARIO, IS_FRAUD
from fraudflow.errors import SchemaError
from fraudflow.eval.metrics import average_precision, drop_known_compromised
from fraudflow.eval.thresholds import validation_review_threshold

__all__ = ["REVIEW_BUDGET", "per_scenario_metrics", "scenario_metrics"]

# Cards a day the analysts review: the Fraud Detection Handbook's k = 100 (chapter 4), and the
# default of `fraudflow policy calibrate --review-budget`.
REVIEW_BUDGET = 100


def scenario_metrics(
    test: pl.DataFrame, validation: pl.DataFrame, *, budget: int = REVIEW_BUDGET
) -> dict[str, Any]:
    """What a run's metrics.json records about scenarios: the review threshold chosen on the
    ``validation`` predictions, and ``per_scenario_metrics`` of the ``test`` predictions."""
    threshold = validation_review_threshold(validation, budget)
    return {
        "review_threshold": threshold,
        "review_budget_cards_per_day": budget,
        "per_scenario": per_scenario_metrics(test, threshold),
    }


def per_scenario_metrics(pred: pl.DataFrame, threshold: float) -> dict[str, dict[str, Any]]:
    """Per scenario (in name order), on a predictions table with ``fraud_scenario``: see the
    module docstring."""
    if FRAUD_SCENARIO not in pred.columns:
        raise SchemaError(
            f"per-scenario metrics need the column `{FRAUD_SCENARIO}`, however: the predictions "
            f"have only {pred.columns}"
        )
    rows = drop_known_compromised(pred).with_columns(pl.col(FRAUD_SCENARIO).fill_null(""))
    legit = rows.filter(pl.col(IS_FRAUD) == 0)["score"].to_numpy()
    frauds = rows.filter((pl.col(IS_FRAUD) == 1) & (pl.col(FRAUD_SCENARIO) != ""))
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(frauds[FRAUD_SCENARIO].unique().to_list()):
        scores = frauds.filter(pl.col(FRAUD_SCENARIO) == name)["score"].to_numpy()
        labels = np.concatenate([np.ones(len(scores)), np.zeros(len(legit))])
        out[name] = {
            "n_fraud": len(scores),
            "recall_at_review_threshold": float(np.mean(scores >= threshold)),
            "average_precision": average_precision(labels, np.concatenate([scores, legit])),
        }
    return out
