"""The service's metric helpers agree with prometheus_client's own."""

import math

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from fraudflow.serve.metrics import observe_many


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
