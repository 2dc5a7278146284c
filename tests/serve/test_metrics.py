"""The service's metric helpers agree with prometheus_client's own."""

import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from fraudflow.eval.drift import population_stability_index
from fraudflow.serve.metrics import CaseGaugeCollector, ScoreDrift, ServiceMetrics, observe_many


def _histogram() -> tuple[Histogram, CollectorRegistry]:
    registry = CollectorRegistry()
    return Histogram("h", "h", buckets=(0.1, 0.5, 0.9), registry=registry), registry


def _exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition without the creation time (the two histograms differ only there)."""
    return [s for s in generate_latest(registry).decode().splitlines() if "_created" not in s]


def test_observe_many_equals_observe_one_by_one() -> None:
    # Values on the bounds (a bound's bucket holds values <= it), past the last bound, and NaN.
    values = np.array([0.0, 0.1, 0.1000001, 0.5, 0.49, 0.9, 0.95, 3.0, math.nan, 0.2])
    one, one_registry = _histogram()
    for v in values:
        one.observe(float(v))
    many, many_registry = _histogram()
    observe_many(many, values[:4])
    observe_many(many, values[4:])
    observe_many(many, values[:0])  # nothing: no change
    assert _exposed(many_registry) == _exposed(one_registry)
    assert 'h_bucket{le="0.1"} 2.0' in _exposed(many_registry)
    assert "h_count 9.0" in _exposed(many_registry)  # NaN falls in no bucket, as with observe


def test_score_drift_pins_the_tie_rule_of_eval_drift() -> None:
    # Reference 0, 1, 2, 3, 4 in two bins: the inner edge is the median, 2. Bins are
    # right-closed, (-inf, 2] and (2, inf), so a score equal to the edge falls in the lower bin:
    # reference shares 3/5, 2/5; recent 2, 2, 2, 2, 4 shares 4/5, 1/5.
    # PSI = (4/5 - 3/5) ln(4/3) + (1/5 - 2/5) ln(1/2) = 0.2 ln(4/3) + 0.2 ln 2 = 0.196166...
    # (Left-closed bins would put every 2 in the upper bin: an empty lower bin, PSI > 2.)
    drift = ScoreDrift(np.arange(5.0), window=5, interval_seconds=0.0, min_scores=5, bins=2)
    drift.add(np.array([2.0, 2.0, 2.0, 2.0, 4.0]))
    expected = 0.2 * math.log(4 / 3) + 0.2 * math.log(2)
    assert drift.psi() == pytest.approx(expected, abs=1e-12)
    assert drift.psi() == pytest.approx(0.196166, abs=1e-6)
    assert drift.psi() == population_stability_index(np.arange(5.0), [2, 2, 2, 2, 4], bins=2)


def test_score_drift_ignores_nan_scores() -> None:
    drift = ScoreDrift(np.arange(5.0), window=4, interval_seconds=0.0, min_scores=1)
    drift.add(np.array([np.nan]))
    assert math.isnan(drift.psi())
    drift.add(np.array([0.0, 4.0]))
    assert drift.psi() == population_stability_index(np.arange(5.0), [0.0, 4.0])


@pytest.mark.parametrize("multiprocess", [False, True])
def test_case_gauges_are_read_at_each_scrape_in_either_mode(
    multiprocess: bool, tmp_path: Path
) -> None:
    metrics = ServiceMetrics(multiprocess_dir=tmp_path if multiprocess else None)
    queue = {"fraudflow_cases_open": 3.0, "fraudflow_cases_oldest_open_age_seconds": 7.5,
             "fraudflow_cases_overdue": 1.0}  # fmt: skip
    reads: list[dict[str, float] | None] = [None, queue]
    metrics.add_scrape_collector(CaseGaugeCollector(lambda: reads.pop(0)))
    assert "fraudflow_cases_open" not in metrics.render().decode()  # no case store yet
    text = metrics.render().decode()
    assert "fraudflow_cases_open 3.0" in text and "fraudflow_cases_overdue 1.0" in text
    assert "fraudflow_cases_oldest_open_age_seconds 7.5" in text


def test_a_failing_case_store_leaves_its_gauges_out_of_the_scrape() -> None:
    metrics = ServiceMetrics()

    def broken() -> dict[str, float]:
        raise OSError("disk I/O error")

    metrics.add_scrape_collector(CaseGaugeCollector(broken))
    text = metrics.render().decode()
    assert "fraudflow_cases_open" not in text and "fraudflow_score_psi" in text
