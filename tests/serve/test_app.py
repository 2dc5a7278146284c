"""The app's life cycle leaves process-wide settings alone; ``run_server`` tunes them."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudflow.serve.app import create_app, tune_process
from tests.helpers.service import (
    AUTH,
    SMALL_SIM,
    LiveServer,
    settings_for,
    simulate_and_train,
    transaction,
    wait_ready,
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("app"), SMALL_SIM)
    return run


@pytest.fixture
def restored() -> Iterator[None]:
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)


def test_an_app_leaves_the_process_tuning_alone(
    tmp_path: Path, restored: None, small_run: Path
) -> None:
    interval, thresholds, frozen = (
        sys.getswitchinterval(),
        gc.get_threshold(),
        gc.get_freeze_count(),
    )
    with LiveServer(create_app(settings_for(small_run, tmp_path))) as live, live.client() as c:
        wait_ready(c)
        assert c.post("/v1/decisions", json=transaction(1), headers=AUTH).status_code == 200
        during = sys.getswitchinterval(), gc.get_threshold(), gc.get_freeze_count()
    assert during == (interval, thresholds, frozen)


def test_tune_process_sets_the_gc_and_the_switch_interval(restored: None) -> None:
    tune_process()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert gc.get_threshold() == (50_000, 20, 20)
