"""The Prometheus observer on real loopback HTTP: feed it loop events, scrape, parse."""

from __future__ import annotations

import math
import socket
import time
import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from fraudflow.errors import ConfigError
from fraudflow.train.loop import EpochLog
from fraudflow.train.metrics_server import PrometheusObserver, serve_metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_gauges_follow_the_loop_and_are_served() -> None:
    clock = FakeClock()
    observer = PrometheusObserver(batch_size=512, clock=clock)
    port = observer.serve(0)
    try:
        observer.on_batch(0, 512, 2048)
        clock.now += 2.0
        observer.on_batch(0, 1024, 2048)  # 512 samples in 2 s
        observer.on_backoff(512, 256)
        observer.on_epoch(EpochLog(epoch=0, loss=0.25, valid_average_precision=0.5, seconds=3.0))
        observer.on_batch(1, 256, 2048)
        metrics = scrape(port)
    finally:
        observer.close()
    assert metrics["fraudflow_train_samples_per_second"] == 256.0
    assert metrics["fraudflow_train_loss"] == 0.25
    assert metrics["fraudflow_train_validation_average_precision"] == 0.5
    assert metrics["fraudflow_train_epoch"] == 2.0  # counting from 1
    assert metrics["fraudflow_train_progress_ratio"] == 0.125
    assert metrics["fraudflow_train_batch_size"] == 256.0
    assert metrics["fraudflow_train_out_of_memory_backoffs_total"] == 1.0
    assert abs(metrics["fraudflow_train_last_progress_timestamp_seconds"] - time.time()) < 60
    assert not any(name.startswith("fraudflow_train_gpu_") for name in metrics)


def test_before_the_first_epoch_loss_and_ap_are_nan_not_zero() -> None:
    with serve_metrics(0, batch_size=64) as observer:
        metrics = scrape(observer.port)
    assert math.isnan(metrics["fraudflow_train_loss"])
    assert math.isnan(metrics["fraudflow_train_validation_average_precision"])
    assert metrics["fraudflow_train_batch_size"] == 64.0


def test_close_releases_the_port() -> None:
    with serve_metrics(0, batch_size=64) as observer:
        port = observer.port
        scrape(port)
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with serve_metrics(port, batch_size=32) as again:  # the next job can listen there
        assert scrape(again.port)["fraudflow_train_batch_size"] == 32.0


def test_two_observers_in_one_process_keep_their_own_values() -> None:
    with serve_metrics(0, batch_size=8) as a, serve_metrics(0, batch_size=16) as b:
        assert scrape(a.port)["fraudflow_train_batch_size"] == 8.0
        assert scrape(b.port)["fraudflow_train_batch_size"] == 16.0


def test_a_busy_port_is_a_config_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"however {port} cannot be listened on"):
            PrometheusObserver(batch_size=8).serve(port)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_is_read_at_scrape_time() -> None:
    device = torch.device("cuda")
    with serve_metrics(0, batch_size=8, device=device) as observer:
        held = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        metrics = scrape(observer.port)
        del held
    assert metrics["fraudflow_train_gpu_memory_bytes"] >= 64 * 2**20
    utilization = metrics.get("fraudflow_train_gpu_utilization_ratio")
    assert utilization is None or 0.0 <= utilization <= 1.0
