"""Prometheus gauges of a training job, served over HTTP while it trains (``--metrics-port``).

    fraudflow_train_samples_per_second                 throughput over the last rate window
    fraudflow_train_loss                               mean loss of the last finished epoch
    fraudflow_train_validation_average_precision       validation AP of the last finished epoch
    fraudflow_train_epoch                              the current epoch, counting from 1
    fraudflow_train_progress_ratio                     fraction of the current epoch done
    fraudflow_train_last_progress_timestamp_seconds    Unix time of the last batch or epoch end
    fraudflow_train_batch_size                         current batch size (after any back-off)
    fraudflow_train_out_of_memory_backoffs_total       out-of-memory batch halvings
    fraudflow_train_gpu_memory_bytes                   CUDA only: torch.cuda.memory_allocated
    fraudflow_train_gpu_utilization_ratio              CUDA only, where NVML answers

A stalled job shows as ``time() - fraudflow_train_last_progress_timestamp_seconds`` growing.
Each observer has its own registry, so several runs in one process (tests, the demo) never
register the same name twice. GPU values are read when Prometheus scrapes, not per batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fraudflow.errors import ConfigError
from fraudflow.train.loop import EpochLog

__all__ = ["PrometheusObserver", "serve_metrics"]

DEFAULT_HOST = "127.0.0.1"


class PrometheusObserver:
    """A LoopObserver that keeps the gauges above; ``serve`` exposes them at ``/metrics``."""

    def __init__(
        self,
        *,
        batch_size: int,
        device: torch.device | None = None,
        rate_window_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self._define_metrics()
        self.batch_size.set(batch_size)
        if device is not None and device.type == "cuda":
            self.registry.register(_GpuCollector(device))
        self.rate_window_seconds = rate_window_seconds
        self.clock = clock
        # (epoch, samples done, time) where the current throughput window began.
        self._window: tuple[int, int, float] | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _define_metrics(self) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"fraudflow_train_{name}", doc, registry=self.registry)

        self.samples_per_second = gauge("samples_per_second", "Training samples per second.")
        self.loss = gauge("loss", "Mean training loss of the last finished epoch.")
        self.valid_ap = gauge(
            "validation_average_precision", "Validation average precision, last finished epoch."
        )
        self.epoch = gauge("epoch", "The current epoch, counting from 1.")
        self.progress = gauge("progress_ratio", "Fraction of the current epoch done.")
        self.last_progress = gauge(
            "last_progress_timestamp_seconds", "Unix time of the last finished batch or epoch."
        )
        self.batch_size = gauge("batch_size", "Current batch size, after any back-off.")
        self.backoffs = Counter(
            "fraudflow_train_out_of_memory_backoffs",
            "Times an out-of-memory error halved the batch size.",
            registry=self.registry,
        )
        # NaN until the first epoch ends: a 0 would read as a real (and alarming) value.
        self.loss.set(float("nan"))
        self.valid_ap.set(float("nan"))

    # --- LoopObserver ---

    def on_batch(self, epoch: int, done: int, total: int) -> None:
        self.epoch.set(epoch + 1)
        self.progress.set(done / total if total > 0 else 0.0)
        self.last_progress.set_to_current_time()
        self._update_rate(epoch, done, self.clock())

    def on_epoch(self, log: EpochLog) -> None:
        self.epoch.set(log.epoch + 1)
        self.progress.set(1.0)
        self.loss.set(log.loss)
        self.valid_ap.set(log.valid_average_precision)
        self.last_progress.set_to_current_time()
        self._window = None  # validation time is not training throughput

    def on_backoff(self, old_batch_size: int, new_batch_size: int) -> None:
        self.backoffs.inc()
        self.batch_size.set(new_batch_size)

    def _update_rate(self, epoch: int, done: int, now: float) -> None:
        """Samples per second over at least ``rate_window_seconds`` of batches in one epoch."""
        window = self._window
        if window is None or window[0] != epoch or done < window[1]:
            self._window = (epoch, done, now)
            return
        _, start_done, start = window
        if now - start >= self.rate_window_seconds and now > start:
            self.samples_per_second.set((done - start_done) / (now - start))
            self._window = (epoch, done, now)

    # --- the HTTP endpoint ---

    def serve(self, port: int, host: str = DEFAULT_HOST) -> int:
        """Serve ``/metrics`` on a daemon thread; return the port (``port=0`` picks a free one)."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ConfigError(
                f"--metrics-port must be a free port on {host}, however {port} cannot be "
                f"listened on: {reason}"
            ) from None
        return self.port

    @property
    def port(self) -> int:
        assert self._server is not None, "serve() first"
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server, self._thread = None, None


@contextlib.contextmanager
def serve_metrics(
    port: int, *, host: str = DEFAULT_HOST, batch_size: int, device: torch.device | None = None
) -> Iterator[PrometheusObserver]:
    observer = PrometheusObserver(batch_size=batch_size, device=device)
    observer.serve(port, host)
    try:
        yield observer
    finally:
        observer.close()


class _GpuCollector(Collector):
    """GPU gauges, read at scrape time so that the training thread never waits on NVML."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "fraudflow_train_gpu_memory_bytes",
            "Bytes held by tensors on the training GPU (torch.cuda.memory_allocated).",
            value=torch.cuda.memory_allocated(self.device),
        )
        utilization = _utilization_percent(self.device)
        if utilization is not None:
            yield GaugeMetricFamily(
                "fraudflow_train_gpu_utilization_ratio",
                "Fraction of the last sample period the GPU was busy (NVML).",
                value=utilization / 100,
            )


def _utilization_percent(device: torch.device) -> float | None:
    try:
        return float(torch.cuda.utilization(device))
    except Exception:
        # No pynvml, or NVML refuses (no driver access, MIG): leave the gauge out.
        return None
