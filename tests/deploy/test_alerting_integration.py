"""Real servers end to end: the decision service, Prometheus scraping it and Alertmanager.

Traffic whose block share jumps must make `FraudflowDecisionShareHigh` reach Alertmanager.
The production rules are used with their time windows compressed (15m -> 10s, 1d -> 90s,
`for` -> 0s, evaluation every second), so the expressions under test are the real ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fraudflow.config import RunConfig, TrainConfig
from fraudflow.train import train_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")),
        reason="needs Debian's prometheus and prometheus-alertmanager",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "fraudflow.rules.yml"
API_KEY = "integration-test-key"
COMPRESSED = {"15m": "10s", "1d": "90s", "1m": "1s"}
BLOCK_AMOUNT = 10_000.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(check: Any, what: str, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")


def _compress(text: str) -> str:
    """The production rules with short windows; `for` durations become 0s."""
    rules = yaml.safe_load(text)
    for group in rules["groups"]:
        if "interval" in group:
            group["interval"] = "1s"
        for rule in group["rules"]:
            expr = rule["expr"]
            for long, short in COMPRESSED.items():
                expr = re.sub(rf"\[{long}\]", f"[{short}]", expr)
            rule["expr"] = expr
            if "for" in rule:
                rule["for"] = "0s"
    return yaml.safe_dump(rules, sort_keys=False)


@pytest.fixture(scope="module")
def run_dir(small_features_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("alerting") / "gbdt"
    train_run(small_features_path, run, RunConfig(train=TrainConfig(model="gbdt")))
    policy = {
        "version": 1,
        "thresholds": {"review": 0.999, "block": 0.9999},
        "rules": [
            {
                "name": "huge_amount",
                "when": {"feature": "amount", "above": BLOCK_AMOUNT - 1},
                "action": "block",
            }
        ],
    }
    (run / "alert-policy.yaml").write_text(yaml.safe_dump(policy))
    return run


class _Servers:
    def __init__(self, tmp: Path, run: Path) -> None:
        self.tmp = tmp
        self.api, self.prom, self.am = _free_port(), _free_port(), _free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.run = run

    def start(self) -> None:
        self._spawn("api", self._api_command(), {"FRAUDFLOW_API_KEYS": API_KEY})
        _wait(lambda: self._status(f"http://127.0.0.1:{self.api}/readyz") == 200, "the API", 90)
        self._spawn("alertmanager", self._alertmanager_command(), {})
        _wait(
            lambda: self._status(f"http://127.0.0.1:{self.am}/-/ready") == 200, "Alertmanager", 60
        )
        self._spawn("prometheus", self._prometheus_command(), {})
        _wait(
            lambda: self._status(f"http://127.0.0.1:{self.prom}/-/ready") == 200, "Prometheus", 60
        )

    def _api_command(self) -> list[str]:
        return [
            sys.executable, "-m", "fraudflow", "serve", "--run", str(self.run),
            "--port", str(self.api), "--policy", str(self.run / "alert-policy.yaml"),
            "--data-dir", str(self.tmp / "serve"),
        ]  # fmt: skip

    def _alertmanager_command(self) -> list[str]:
        config = {
            "route": {"receiver": "null", "group_wait": "1s", "group_interval": "1s"},
            "receivers": [{"name": "null"}],
        }
        path = self.tmp / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config))
        return [
            "prometheus-alertmanager", f"--config.file={path}",
            f"--storage.path={self.tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.am}", "--cluster.listen-address=",
        ]  # fmt: skip

    def _prometheus_command(self) -> list[str]:
        rules = self.tmp / "rules.yml"
        rules.write_text(_compress(RULES.read_text()))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.am}"]}]}]
            },
            "scrape_configs": [
                {
                    "job_name": "fraudflow-api",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.api}"]}],
                }
            ],
        }
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return [
            "prometheus", f"--config.file={path}", f"--storage.tsdb.path={self.tmp / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{self.prom}",
        ]  # fmt: skip

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        log.close()
        self.processes.append(process)

    @staticmethod
    def _status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def servers(tmp_path: Path, run_dir: Path) -> Iterator[_Servers]:
    stack = _Servers(tmp_path, run_dir)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# Before the server's clock: it refuses transactions more than a day ahead of it.
_START = datetime.now(UTC) - timedelta(days=2)


def _decide(stack: _Servers, index: int, amount: float) -> str:
    ts = _START + timedelta(seconds=index)
    body = {
        "transaction_id": f"tx-{index}",
        "timestamp": ts.isoformat(),
        "customer_id": f"c{index % 50}",
        "terminal_id": f"t{index % 80}",
        "amount": amount,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.api}/v1/decisions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["decision"])


def _query(stack: _Servers, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.prom}/api/v1/query?query={urllib.parse.quote(promql)}"
    return list(_get(url)["data"]["result"])


def _alert_names(stack: _Servers) -> set[str]:
    alerts = _get(f"http://127.0.0.1:{stack.am}/api/v2/alerts")
    return {a["labels"]["alertname"] for a in alerts if a["labels"].get("decision") == "block"}


def _traffic(stack: _Servers, start: int, seconds: float, block_every: int) -> int:
    """Decisions as fast as one client goes; every ``block_every``-th one is blocked."""
    index, deadline = start, time.monotonic() + seconds
    while time.monotonic() < deadline:
        blocked = index % block_every == 0
        decision = _decide(stack, index, BLOCK_AMOUNT if blocked else 25.0)
        assert (decision == "block") == blocked
        index += 1
    return index


def test_block_rate_jump_reaches_alertmanager(servers: _Servers) -> None:
    # A normal period, about 3% blocked, long enough to set the "daily" share.
    index = _traffic(servers, 0, 45, block_every=33)
    assert _wait(lambda: _query(servers, "fraudflow_decisions_total"), "the decision series", 30)
    assert "FraudflowDecisionShareHigh" not in _alert_names(servers)
    # An attack: half of the transactions are now blocked, until the alert arrives.
    deadline = time.monotonic() + 90
    while "FraudflowDecisionShareHigh" not in _alert_names(servers):
        assert time.monotonic() < deadline, "the alert never reached Alertmanager"
        index = _traffic(servers, index, 1.0, block_every=2)
    # Prometheus holds the series the alert is built on: the block share, far above the ~3%.
    shares = _query(servers, 'fraudflow:decisions:share15m{decision="block"}')
    assert shares and float(shares[0]["value"][1]) > 0.1
