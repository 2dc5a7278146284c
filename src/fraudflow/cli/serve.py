"""`fraudflow serve`: the real-time decision service (FastAPI on uvicorn)."""

from __future__ import annotations

from pathlib import Path

import typer

from fraudflow.cli.errors import handle_errors

__all__ = ["serve"]


@handle_errors
def serve(
    run: Path = typer.Option(None, "--run", help="Run folder whose model to serve."),
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="Port to listen on (default 8000)."),
    workers: int = typer.Option(None, "--workers", help="Worker processes (default 1)."),
    state: str = typer.Option(
        None,
        "--state",
        help="Feature state: sqlite:///<path>, redis://host:port/db or "
        "redis-cluster://host:port[,host:port...].",
    ),
    policy: Path = typer.Option(
        None, "--policy", help="Decision policy YAML (default RUN/policy.yaml, else built-in)."
    ),
    data_dir: Path = typer.Option(
        None, "--data-dir", help="Folder for state.db and audit.db (default RUN/serve)."
    ),
    audit: Path = typer.Option(None, "--audit", help="Audit log (default DATA_DIR/audit.db)."),
    cases: str = typer.Option(
        None,
        "--cases",
        help="The review console's cases, accounts and audit trail in PostgreSQL, shared by "
        "replicas: postgresql://user[:password]@host[:port]/db (default: SQLite files beside "
        "the audit log). Env: FRAUDFLOW_CASES.",
    ),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve without API keys (never in production)."
    ),
    max_amount: float = typer.Option(
        None, "--max-amount", help="Largest transaction amount accepted (default 1e9); 422 above."
    ),
    max_clock_skew: float = typer.Option(
        None,
        "--max-clock-skew",
        help="Seconds a transaction may be dated ahead of the server's clock (default 86400, "
        "one day); 422 beyond. Env: FRAUDFLOW_MAX_CLOCK_SKEW_SECONDS.",
    ),
    shadow: str = typer.Option(
        None,
        "--shadow",
        help="Challenger runs scored in shadow on every decision, RUN[,RUN...]: after the "
        "answer, recorded in the audit log; only the --run model decides.",
    ),
    split: str = typer.Option(
        None,
        "--split",
        help="RUN=5%[,RUN=2%]: that challenger decides a stable, hash-chosen share of cards.",
    ),
    shadow_budget: float = typer.Option(
        None,
        "--shadow-budget",
        help="Seconds a decision waits for the --split challengers past the champion's own "
        "scoring (default 0.01); later ones are recorded as timed out.",
    ),
) -> None:
    """Serve fraud decisions over HTTP.

    Every flag is also an environment variable, FRAUDFLOW_<FLAG> (e.g. FRAUDFLOW_RUN). API keys
    come from FRAUDFLOW_API_KEYS / FRAUDFLOW_ADMIN_KEYS (comma-separated) or the files named by
    FRAUDFLOW_API_KEYS_FILE / FRAUDFLOW_ADMIN_KEYS_FILE; without any, the server refuses to
    start unless --insecure-no-auth is given.
    """
    from fraudflow.serve.app import run_server
    from fraudflow.serve.settings import load_settings

    settings = load_settings(
        run=run,
        host=host,
        port=port,
        workers=workers,
        state=state,
        policy=policy,
        data_dir=data_dir,
        audit=audit,
        cases=cases,
        insecure_no_auth=insecure_no_auth or None,  # unset: the environment may still say so
        max_amount=max_amount,
        max_clock_skew_seconds=max_clock_skew,
        shadow=shadow,
        split=split,
        shadow_budget_seconds=shadow_budget,
    )
    run_server(settings)
