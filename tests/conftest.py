"""Fixtures for the whole suite."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import build_features, write_feature_table
from tests.helpers.postgres import PostgresServer, postgres_bin


@pytest.fixture(scope="session", autouse=True)
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every tracked `fraudflow train` in the suite (subprocesses included) records into a
    temporary MLflow store, never into the repository's mlruns/."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield uri


def _simulated_features(factory: pytest.TempPathFactory, name: str, sim: SimulationConfig) -> Path:
    cfg = FeatureConfig()
    path = factory.mktemp(name) / "features.parquet"
    write_feature_table(build_features(simulate(sim), cfg), path, cfg)
    return path


@pytest.fixture(scope="session")
def small_features_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny feature table (60 days, ~33k transactions) for runs whose quality does not matter."""
    sim = SimulationConfig(n_customers=300, n_terminals=600, n_days=60, seed=0)
    return _simulated_features(tmp_path_factory, "small", sim)


@pytest.fixture(scope="session")
def features_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated feature table: 75 days, ~200k transactions, ~0.8% fraud."""
    sim = SimulationConfig(n_customers=1500, n_terminals=3000, n_days=75, seed=0)
    return _simulated_features(tmp_path_factory, "data", sim)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the session. Skipped where its programs are
    absent, except in CI (``CI`` set), where ``.ci/run`` installs them: there it fails."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's programs are absent: .ci/run installs the postgresql package")
        pytest.skip("PostgreSQL's programs are absent (Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database of the session's server."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def cases_url(request: pytest.FixtureRequest) -> str | None:
    """The review console's storage, each test run on both: None, the SQLite files beside the
    audit log (the default); or ``--cases`` naming a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url
