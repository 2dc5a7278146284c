"""The decision service's settings: command-line flags over ``FRAUDFLOW_*`` environment variables.

``load_settings`` is the one place that reads the environment; everything below receives the
validated ``ServeSettings`` object. Validation happens at start-up, so a missing run folder or a
malformed state URL stops the command with a message (exit 2), not the first request.

Where things live by default (``--data-dir``, default ``RUN_DIR/serve``):

    <data-dir>/state.db     the feature state (unless --state names another store)
    <data-dir>/audit.db     the audit log of decisions and labels (unless --audit)
    cases.db, users.db      the review console's cases and accounts, beside the audit log
                            (unless --cases names a PostgreSQL database for both)

With ``--workers > 1`` the settings travel to the worker processes through the environment
(``settings_environment``), the way uvicorn's app factories expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from fraudflow.errors import ConfigError
from fraudflow.serve.database import POSTGRES_URL_FORM, is_postgres_url, redact_url
from fraudflow.serve.redis_shards import (
    CLUSTER_SCHEMES,
    REDIS_SCHEMES,
    URL_FORMS,
    cluster_nodes,
    cluster_options,
)

__all__ = [
    "DEFAULT_SPLIT_SALT",
    "ENV_PREFIX",
    "ServeSettings",
    "audit_path_for",
    "load_settings",
    "parse_splits",
    "settings_environment",
    "split_text",
]

ENV_PREFIX = "FRAUDFLOW_"
MIB = 1024 * 1024
_STATE_SCHEMES = ("sqlite", *REDIS_SCHEMES)
# Changing it draws new split shares (fraudflow.serve.shadow.split_buckets).
DEFAULT_SPLIT_SALT = "fraudflow-split-1"


class ServeSettings(BaseSettings):
    """Every knob of ``fraudflow serve``; each field is also ``FRAUDFLOW_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    run: Path
    host: str = "127.0.0.1"  # loopback unless asked: the service holds customer data
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    # sqlite:///<path>, redis://... or redis-cluster://...; None: <data-dir>/state.db
    state: str | None = None
    policy: Path | None = None  # None: RUN_DIR/policy.yaml if present, else the default
    data_dir: Path | None = None  # None: RUN_DIR/serve
    audit: Path | None = None  # None: <data-dir>/audit.db
    api_keys: SecretStr | None = None  # comma-separated
    api_keys_file: Path | None = None  # one key per line, '#' comments
    admin_keys: SecretStr | None = None
    admin_keys_file: Path | None = None
    insecure_no_auth: bool = False
    max_body_bytes: int = Field(1 * MIB, ge=1024)
    max_batch_body_bytes: int = Field(16 * MIB, ge=1024)
    # A transaction's amount above this is refused (422): it would overflow the window sums.
    max_amount: float = Field(1e9, gt=0, allow_inf_nan=False)
    # A transaction dated further ahead of the server's clock is refused (422), and no single
    # event may move the state's forgetting watermark by more than this (--max-clock-skew).
    max_clock_skew_seconds: float = Field(86_400.0, gt=0, allow_inf_nan=False)
    psi_window: int = Field(10_000, ge=100)  # scores kept for fraudflow_score_psi
    psi_interval_seconds: float = Field(5.0, gt=0)
    # How long a duplicate transaction_id waits for a concurrent request to record its decision.
    duplicate_wait_seconds: float = Field(5.0, ge=0)
    # With Redis state: how long each decision is kept there for replays of its transaction_id
    # (the idempotency window); after it, a repeat is decided again from the state.
    idempotency_ttl_seconds: int = Field(7 * 86_400, ge=60)
    # Workers > 1: how often each worker looks for a reload done by another worker.
    reload_poll_seconds: float = Field(1.0, gt=0)
    # Start-up and reload: how long the child process that loads and probes a run's model may
    # take (it imports the model libraries first).
    model_check_timeout_seconds: float = Field(120.0, gt=0)
    # /readyz: how often the state store and the audit log are probed, and how long one of
    # their calls may run before they count as not responding (fraudflow.serve.health).
    health_probe_seconds: float = Field(1.0, gt=0)
    health_stall_seconds: float = Field(2.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    # Champion and challengers (fraudflow.serve.shadow): challenger runs scored in shadow
    # (comma-separated), the shares of cards some of them decide (RUN=5%[,RUN=2%]), how long a
    # group's answer waits for the split ones past the champion's own scoring, and the salt
    # of the split's hash.
    shadow: str | None = None
    split: str | None = None
    shadow_budget_seconds: float = Field(0.01, gt=0, le=10, allow_inf_nan=False)
    split_salt: str = Field(DEFAULT_SPLIT_SALT, min_length=1)
    # run_server tunes its processes for serving (GC thresholds and freeze, GIL switch
    # interval: fraudflow.serve.app.tune_process); off, the interpreter's defaults stay.
    process_tuning: bool = True
    log_level: str = "info"
    # The review console (/console, fraudflow.serve.console): review (and block) decisions
    # open cases in <audit folder>/cases.db, its accounts are in <audit folder>/users.db.
    console: bool = True
    # postgresql://...: the console's cases, accounts, sessions and audit trail in that
    # database, shared by every replica; None: the SQLite files beside the audit log.
    cases: str | None = None
    open_block_cases: bool = True  # block decisions open confirm-only cases
    case_sla_seconds: int = Field(24 * 3_600, ge=1)
    case_hold_seconds: int = Field(15 * 60, ge=1)  # a hold lapses after this long idle
    console_session_seconds: int = Field(8 * 3_600, ge=60)  # idle sign-in sessions end
    # prometheus_client's own variable (no FRAUDFLOW_ prefix): set, metrics are multiprocess.
    prometheus_multiproc_dir: Path | None = Field(
        None, validation_alias=AliasChoices("prometheus_multiproc_dir", "PROMETHEUS_MULTIPROC_DIR")
    )

    @field_validator("run")
    @classmethod
    def _run_is_a_bundle(cls, run: Path) -> Path:
        return _run_is_a_bundle(run)

    @field_validator("shadow")
    @classmethod
    def _shadow_runs(cls, runs: str | None) -> str | None:
        for run in _run_list(runs):
            _run_is_a_bundle(run)
        return runs

    @field_validator("split")
    @classmethod
    def _split_shares(cls, text: str | None) -> str | None:
        try:
            for run in parse_splits(text):
                _run_is_a_bundle(run)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return text

    @field_validator("state")
    @classmethod
    def _state_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        scheme, sep, rest = url.partition("://")
        ok = sep and scheme in _STATE_SCHEMES and (scheme != "sqlite" or len(rest) > 1)
        if not ok or (scheme == "sqlite" and not rest.startswith("/")):
            shown = f"{scheme}://...@{rest.rpartition('@')[2]}" if "@" in rest else url
            raise ValueError(f"must be sqlite:///<path> or {URL_FORMS}, however got {shown!r}")
        if scheme in CLUSTER_SCHEMES:
            try:
                cluster_nodes(url)
                cluster_options(url)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return url

    @field_validator("cases")
    @classmethod
    def _cases_url(cls, url: str | None) -> str | None:
        if url is not None and not (is_postgres_url(url) and url.partition("://")[2]):
            raise ValueError(f"must be {POSTGRES_URL_FORM}, however got {redact_url(url)!r}")
        return url

    @field_validator("policy", "api_keys_file", "admin_keys_file")
    @classmethod
    def _file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file {path} does not exist")
        return path

    @model_validator(mode="after")
    def _some_keys_or_insecure(self) -> ServeSettings:
        sources = (self.api_keys, self.api_keys_file, self.admin_keys, self.admin_keys_file)
        if not self.insecure_no_auth and all(s is None for s in sources):
            raise ValueError(
                "no API keys are configured: set FRAUDFLOW_API_KEYS (or FRAUDFLOW_API_KEYS_FILE) "
                "and FRAUDFLOW_ADMIN_KEYS, or pass --insecure-no-auth to serve without "
                "authentication"
            )
        return self

    @property
    def data_folder(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.run / "serve"

    @property
    def audit_path(self) -> Path:
        return self.audit if self.audit is not None else self.data_folder / "audit.db"

    @property
    def cases_path(self) -> Path:
        return self.audit_path.parent / "cases.db"

    @property
    def cases_target(self) -> Path | str:
        """Where the console keeps its cases: the --cases URL, else cases.db."""
        return self.cases if self.cases is not None else self.cases_path

    @property
    def state_default_path(self) -> Path:
        return self.data_folder / "state.db"

    @property
    def challenger_runs(self) -> list[Path]:
        """The challengers: the --shadow runs, then the --split runs not among them."""
        runs = [run.resolve() for run in _run_list(self.shadow)]
        return runs + [run for run in parse_splits(self.split) if run not in runs]


def _run_list(runs: str | None) -> list[Path]:
    return [Path(r.strip()) for r in (runs or "").split(",") if r.strip()]


def _run_is_a_bundle(run: Path) -> Path:
    if not run.is_dir():
        raise ValueError(f"run folder {run} does not exist")
    if not (run / "model" / "meta.json").is_file():
        raise ValueError(f"{run} holds no model bundle (model/meta.json): is it a run?")
    return run.resolve()


def split_text(split: Mapping[str, str]) -> str:
    """A reload's ``{"RUN": "5%"}`` in ``--split``'s form, for ``parse_splits``."""
    return ",".join(f"{run}={share}" for run, share in split.items())


def parse_splits(text: str | None) -> dict[Path, float]:
    """``RUN=5%[,RUN=2.5%...]`` -> {resolved run folder: share in (0, 1]}; ``ConfigError``
    naming the entry otherwise. The shares together may not exceed 100 %."""
    out: dict[Path, float] = {}
    for entry in [e.strip() for e in (text or "").split(",") if e.strip()]:
        run, sep, share = entry.rpartition("=")
        number = share.strip().removesuffix("%")
        try:
            percent = float(number) if sep and run and share.strip().endswith("%") else -1.0
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise ConfigError(
                f"must be RUN=<percent>% with 0 < percent <= 100, however got {entry!r}"
            )
        out[Path(run.strip()).resolve()] = percent / 100
    if sum(out.values()) > 1 + 1e-9:
        raise ConfigError(f"the split shares add up to {100 * sum(out.values()):g}% > 100%")
    return out


def load_settings(**flags: Any) -> ServeSettings:
    """Settings from the given flags (None: not given) over the environment.

    Raises ``ConfigError`` listing each invalid setting by its flag name.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return ServeSettings(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


# Flags whose name leaves out the field's unit (the help text gives it).
_FLAG_OF_FIELD = {
    "max_clock_skew_seconds": "--max-clock-skew",
    "shadow_budget_seconds": "--shadow-budget",
}


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if where:
            flag = _FLAG_OF_FIELD.get(where, "--" + where.replace("_", "-"))
            env = ENV_PREFIX + where.upper()
            problems.append(f"{flag} ({env}): {message}")
        else:
            problems.append(message)
    return "invalid serve settings: " + "; ".join(problems)


def settings_environment(settings: ServeSettings) -> dict[str, str]:
    """``FRAUDFLOW_*`` variables that rebuild ``settings`` in a worker process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None or name == "prometheus_multiproc_dir":  # travels under its own name
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[ENV_PREFIX + name.upper()] = str(value)
    return env


def audit_path_for(*, audit: Path | None, run: Path | None, data_dir: Path | None) -> Path:
    """The audit log ``fraudflow serve`` writes for these flags (for ``decisions export``)."""
    if audit is not None:
        return audit
    if data_dir is not None:
        return data_dir / "audit.db"
    if run is not None:
        return run / "serve" / "audit.db"
    raise ConfigError("name the audit log: --audit PATH, or the --run (and --data-dir) it serves")
