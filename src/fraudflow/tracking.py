"""Experiment tracking with MLflow: one MLflow run per training run.

An MLflow run records the flattened run config, the feature table it read (its path and a
content fingerprint), the git commit of the project, each epoch's loss, validation average
precision and throughput, the final test metrics, and the run folder's ``report.html``,
``metrics.json``, ``config.json`` and ``model/`` bundle as artifacts.

The store: MLflow 3 refuses its old file store (``./mlruns`` folders; 3.17 raises unless
``MLFLOW_ALLOW_FILE_STORE`` is set) and recommends a database, so the local default is SQLite
at ``mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts``, under the project folder. The
CLI passes ``MLFLOW_TRACKING_URI`` in when it is set (e.g. a tracking server).

mlflow is imported inside functions: it takes seconds to import, and ``import fraudflow`` (and
every command that does not track) should not pay for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from fraudflow.errors import ArtifactError, ConfigError, DataError, FraudflowError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_EXPERIMENT",
    "FEATURE_SPEC_FILE",
    "RUN_METRICS",
    "SEARCH_LIMIT",
    "NullTracker",
    "RunTracker",
    "Tracker",
    "TrackingConfig",
    "compare_runs",
    "data_fingerprint",
    "git_commit",
    "list_runs",
    "open_tracker",
    "resolve_tracking_config",
    "run_params",
]

DEFAULT_EXPERIMENT = "fraudflow"
LOCAL_STORE_DIR = "mlruns"
# The test metrics `fraudflow runs` shows, named as in metrics.json.
RUN_METRICS = (
    "roc_auc",
    "average_precision",
    "card_precision_at_100",
    "recall_at_1pct_fpr",
    "train_seconds",
    "train_samples_per_second",
)
FEATURE_SPEC_FILE = "feature_spec.toml"  # the run's feature spec, beside config.json
ARTIFACT_FILES = ("report.html", "metrics.json", "config.json", FEATURE_SPEC_FILE)
MODEL_DIR = "model"  # where fraudflow.artifacts writes the bundle inside a run folder
# MLflow's log_batch takes at most 100 params per call.
PARAMS_PER_BATCH = 100
# The most runs one search returns (the limit of MLflow's SQL store).
SEARCH_LIMIT = 50_000


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT
    # Artifact root of the experiment if fraudflow creates it; None lets the store decide.
    artifact_location: str | None = None
    # The folder whose git commit a run records; None records "unknown".
    project_dir: Path | None = None


def resolve_tracking_config(
    project_dir: Path,
    *,
    env_uri: str | None = None,
    experiment: str | None = None,
    enabled: bool = True,
) -> TrackingConfig:
    """``env_uri`` (``MLFLOW_TRACKING_URI``, read by the caller) if set, else SQLite in
    ``PROJECT/mlruns``. A local SQLite store keeps its artifacts beside its database, so where
    a run starts from does not decide where its artifacts land."""
    project_dir = Path(project_dir).resolve()
    uri = env_uri or f"sqlite:///{(project_dir / LOCAL_STORE_DIR / 'mlflow.db').as_posix()}"
    database = _sqlite_path(uri)
    return TrackingConfig(
        enabled=enabled,
        tracking_uri=uri,
        experiment=experiment or DEFAULT_EXPERIMENT,
        artifact_location=(database.parent / "artifacts").as_uri() if database else None,
        project_dir=project_dir,
    )


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None. A relative path is relative to
    the working folder, as SQLite itself reads it."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or len(uri) == len(prefix):
        return None
    return Path(uri[len(prefix) :].partition("?")[0]).resolve()  # no ?timeout=... options


# --- what a run records -------------------------------------------------------------------------


def run_params(
    config: Mapping[str, Any], features_path: Path, *, project_dir: Path | None
) -> dict[str, str]:
    """The flattened config (``train.model``, ...) plus the data and code the run used."""
    params = {key: _param_value(value) for key, value in _flatten(config)}
    params["features_path"] = str(Path(features_path).resolve())
    params["data_fingerprint"] = data_fingerprint(Path(features_path))
    params["git_commit"] = git_commit(project_dir) if project_dir else "unknown"
    return params


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _param_value(value: Any) -> str:
    # JSON spelling, as in the run's config.json: null, true, [256, 128].
    return value if isinstance(value, str) else json.dumps(value)


def data_fingerprint(path: Path) -> str:
    """``sha256:`` of the feature file's bytes (what ``sha256sum`` prints), or for a folder of
    shards, of its ``name  sha256`` lines. Content only: a copy keeps it, any changed byte
    changes it. Hashing reads the whole table once (about 1 GB/s)."""
    if path.is_file():
        return f"sha256:{_file_sha256(path)}"
    if not path.is_dir():
        raise DataError(f"feature table {path} does not exist (build it with `fraudflow features`)")
    lines = [f"{f.name}  {_file_sha256(f)}\n" for f in sorted(path.glob("*.parquet"))]
    return f"sha256:{hashlib.sha256(''.join(lines).encode()).hexdigest()}"


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def git_commit(project_dir: Path) -> str:
    """``git rev-parse HEAD`` in ``project_dir``; "unknown" outside a repository or without git."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


# --- trackers -----------------------------------------------------------------------------------


class RunTracker(Protocol):
    """What training needs from a tracker. As a context manager, an exception inside ends an
    open run as FAILED (KILLED for an interrupt)."""

    run_id: str | None

    def start(
        self,
        config: Mapping[str, Any],
        *,
        features_path: Path,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> None: ...

    def log_epoch(
        self, epoch: int, loss: float, valid_ap: float, samples_per_second: float
    ) -> None: ...

    def finish(self, metrics: Mapping[str, Any], run_dir: Path) -> None: ...

    def fail(self, *, interrupted: bool = False) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _EndsOnError:
    """The context-manager half of ``RunTracker``: an exception inside calls ``fail``."""

    def fail(self, *, interrupted: bool = False) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            return
        # The training error is the one to report, not a second one from the store.
        with contextlib.suppress(FraudflowError):
            self.fail(interrupted=not issubclass(exc_type, Exception))


class NullTracker(_EndsOnError):
    """Records nothing (``--no-track``, DDP ranks other than 0)."""

    run_id: str | None = None

    def start(
        self,
        config: Mapping[str, Any],
        *,
        features_path: Path,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        pass

    def log_epoch(
        self, epoch: int, loss: float, valid_ap: float, samples_per_second: float
    ) -> None:
        pass

    def finish(self, metrics: Mapping[str, Any], run_dir: Path) -> None:
        pass

    def fail(self, *, interrupted: bool = False) -> None:
        pass


class Tracker(_EndsOnError):
    """One MLflow run: ``start`` opens it, ``log_epoch`` adds a step, ``finish`` logs the final
    metrics and artifacts and closes it FINISHED."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._open = False

    def start(
        self,
        config: Mapping[str, Any],
        *,
        features_path: Path,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        # Params first: a missing feature table fails before an MLflow run exists.
        params = run_params(config, features_path, project_dir=self.cfg.project_dir)
        # The standard tag makes the MLflow UI show the commit beside the run.
        all_tags = {"mlflow.source.git.commit": params["git_commit"], **(tags or {})}
        self._client = _client(self.cfg)
        with _store_errors(self.cfg, "start a run"):
            experiment_id = _experiment_id(self._client, self.cfg)
            run = self._client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            self.run_id, self._open = run.info.run_id, True
            _log_params(self._client, self.run_id, params)

    def log_epoch(
        self, epoch: int, loss: float, valid_ap: float, samples_per_second: float
    ) -> None:
        values = {
            "epoch_loss": loss,
            "epoch_validation_average_precision": valid_ap,
            "epoch_samples_per_second": samples_per_second,
        }
        self._log_metrics(values, step=epoch)

    def finish(self, metrics: Mapping[str, Any], run_dir: Path) -> None:
        """Log the numeric entries of ``metrics`` and the run folder's files, then close."""
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._log_metrics(numeric, step=0)
        client, run_id = self._active()
        with _store_errors(self.cfg, "log the run's artifacts"):
            for name in ARTIFACT_FILES:
                if (run_dir / name).is_file():
                    client.log_artifact(run_id, str(run_dir / name))
            if (run_dir / MODEL_DIR).is_dir():
                client.log_artifacts(run_id, str(run_dir / MODEL_DIR), artifact_path=MODEL_DIR)
            client.set_terminated(run_id, "FINISHED")
        self._open = False

    def fail(self, *, interrupted: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        client, run_id = self._active()
        with _store_errors(self.cfg, "end the run"):
            client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")

    def _active(self) -> tuple[MlflowClient, str]:
        assert self._client is not None and self.run_id is not None, "start() the run first"
        return self._client, self.run_id

    def _log_metrics(self, values: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self._active()
        now_ms = int(time.time() * 1000)
        batch = [Metric(key, value, now_ms, step) for key, value in values.items()]
        with _store_errors(self.cfg, "log metrics"):
            client.log_batch(run_id, metrics=batch)


def open_tracker(cfg: TrackingConfig) -> RunTracker:
    return Tracker(cfg) if cfg.enabled else NullTracker()


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


# --- reading runs back --------------------------------------------------------------------------


def list_runs(cfg: TrackingConfig, *, max_results: int = 1000) -> list[dict[str, Any]]:
    """The experiment's runs, newest first: id, name, model, start time, status, metrics."""
    if _missing_local_store(cfg):
        return []  # nothing recorded yet: do not create an empty database just to say so
    client = _client(cfg)
    with _store_errors(cfg, "list runs"):
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return []
        runs = client.search_runs(
            [experiment.experiment_id],
            order_by=["attributes.start_time DESC"],
            max_results=max_results,
        )
    return [_row(run) for run in runs]


def compare_runs(cfg: TrackingConfig, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``list_runs`` for the given ids, in order; a unique id prefix is enough."""
    rows = list_runs(cfg, max_results=SEARCH_LIMIT)
    return [_find(rows, ref, cfg) for ref in run_ids]


def _find(rows: Sequence[dict[str, Any]], ref: str, cfg: TrackingConfig) -> dict[str, Any]:
    matches = [row for row in rows if row["run_id"].startswith(ref)] if ref else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ArtifactError(
            f"no run {ref!r} in experiment {cfg.experiment!r} at {cfg.tracking_uri}; "
            "`fraudflow runs list` shows the recorded runs"
        )
    ids = ", ".join(row["run_id"] for row in matches[:5])
    raise ArtifactError(
        f"run id prefix {ref!r} is ambiguous: it matches {len(matches)} runs ({ids})"
    )


def _row(run: Run) -> dict[str, Any]:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "model": data.params.get("train.model", "?"),
        "start_time": datetime.fromtimestamp(info.start_time / 1000, tz=UTC),
        "status": info.status,
        **{key: data.metrics.get(key) for key in RUN_METRICS},
        "params": dict(data.params),
    }


# --- the store ----------------------------------------------------------------------------------


def _client(cfg: TrackingConfig) -> MlflowClient:
    database = _sqlite_path(cfg.tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates files, not folders
    with warnings.catch_warnings():
        # MLflow 3.17's SQL models use SQLAlchemy's `noload` loader strategy, deprecated in
        # SQLAlchemy 2.1: a warning once, when MLflow imports its store, that only MLflow can fix.
        warnings.filterwarnings(
            "ignore",
            message=r"The ``noload`` loader strategy is deprecated",
            category=DeprecationWarning,
        )
        from mlflow.tracking import MlflowClient

        with _store_errors(cfg, "open the tracking store"):
            return MlflowClient(tracking_uri=cfg.tracking_uri)


def _experiment_id(client: MlflowClient, cfg: TrackingConfig) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return client.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)
    except MlflowException:
        # Another run created it between the lookup and here.
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _missing_local_store(cfg: TrackingConfig) -> bool:
    database = _sqlite_path(cfg.tracking_uri)
    return database is not None and not database.exists()


@contextlib.contextmanager
def _store_errors(cfg: TrackingConfig, action: str) -> Iterator[None]:
    """Turn MLflow's and the file system's errors into one message that names the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise ConfigError(
            f"MLflow could not {action} at {cfg.tracking_uri}: {message} "
            "(set MLFLOW_TRACKING_URI to a reachable store, or pass --no-track)"
        ) from exc
