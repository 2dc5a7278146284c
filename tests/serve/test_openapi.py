"""The OpenAPI document against the real server: what it promises, and schemathesis on it.

schemathesis runs as its command line does, against the app on real loopback HTTP with a
trained run, every check enabled, a bounded number of cases per route and a fixed seed (its
hooks: ``tests/serve/schemathesis_hooks.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fraudflow.serve.app import create_app
from tests.helpers.service import (
    CLIENT_KEY,
    SMALL_SIM,
    LiveServer,
    settings_for,
    simulate_and_train,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[2]
_POSTS = {
    "/v1/decisions": {"200", "400", "401", "413", "415", "422", "503"},
    "/v1/decisions/batch": {"200", "400", "401", "413", "415", "422", "503"},
    "/v1/labels": {"200", "400", "401", "413", "415", "422", "503"},
    "/v1/admin/reload": {"200", "400", "401", "403", "413", "415", "422", "503"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = simulate_and_train(tmp_path_factory.mktemp("openapi"), SMALL_SIM)
    return run


def test_the_document_names_the_key_scheme_and_every_status(run_dir: Path, tmp_path: Path) -> None:
    doc = create_app(settings_for(run_dir, tmp_path)).openapi()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: a client key, or an admin key (which is also a client key).",
    }
    for path, statuses in _POSTS.items():
        post = doc["paths"][path]["post"]
        assert post["security"] == [{"bearer": []}]
        assert set(post["responses"]) == statuses, path
        assert "WWW-Authenticate" in post["responses"]["401"]["headers"]
        assert "Retry-After" in post["responses"]["503"]["headers"]
        error = post["responses"]["422"]["content"]["application/json"]["schema"]
        assert error["$ref"].endswith("/ValidationErrorOut")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in doc["paths"][path]["get"]
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    tx = doc["components"]["schemas"]["TransactionIn"]["properties"]
    assert tx["amount"] == {"type": "number", "minimum": 0.0, "maximum": 1e9, "title": "Amount"}
    integer = tx["transaction_id"]["anyOf"][1]
    assert (integer["exclusiveMinimum"], integer["exclusiveMaximum"]) == (-(2**63) - 1, 2**63)


def test_schemathesis_finds_no_failure(run_dir: Path, tmp_path: Path) -> None:
    app = create_app(settings_for(run_dir, tmp_path / "data"))
    with LiveServer(app) as live:
        with live.client() as c:
            wait_ready(c)
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{live.url}/openapi.json",
            "--checks", "all", "--max-response-time", "10", "--max-examples", "40",
            "--seed", "14", "--workers", "1", "-H", f"Authorization: Bearer {CLIENT_KEY}",
        ]  # fmt: skip
        env = os.environ | {
            "SCHEMATHESIS_HOOKS": "tests.serve.schemathesis_hooks",
            "PYTHONPATH": str(REPO),
            "NO_COLOR": "1",
        }
        # Its own folder: hypothesis keeps its example database in the working directory.
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert counts is not None and counts[1] == counts[2] and int(counts[1]) > 300, report
