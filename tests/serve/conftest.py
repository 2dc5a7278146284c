"""Fixtures of the service tests: a real server on loopback over the module's ``run_dir``."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fraudflow.serve.app import create_app
from tests.helpers.service import LiveServer, settings_for, wait_ready


@pytest.fixture
def server(run_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """The real app on 127.0.0.1, ready, with its data in the test's own folder."""
    with LiveServer(create_app(settings_for(run_dir, tmp_path / "data"))) as live:
        with live.client() as client:
            wait_ready(client)
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
