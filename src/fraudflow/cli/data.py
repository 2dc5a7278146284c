"""`fraudflow generate` and `fraudflow features`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from fraudflow.cli.errors import err_console, handle_errors
from fraudflow.cli.progress import spinner, step_bar
from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.errors import ConfigError

__all__ = ["features_app", "generate"]


@handle_errors
def generate(
    out: Path = typer.Option(..., "--out", help="Output file, .parquet or .csv."),
    customers: int = typer.Option(5_000, "--customers", help="Number of customers (cards)."),
    terminals: int = typer.Option(10_000, "--terminals", help="Number of terminals."),
    days: int = typer.Option(90, "--days", help="Number of simulated days."),
    start: datetime = typer.Option(
        "2026-01-01", "--start", formats=["%Y-%m-%d"], help="First day."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same file."),
) -> None:
    """Simulate a labelled transaction log with fraud scenarios."""
    from fraudflow.data.io import write_table
    from fraudflow.data.simulator import simulate

    cfg = SimulationConfig(
        n_customers=customers,
        n_terminals=terminals,
        n_days=days,
        start_date=start.date(),
        seed=seed,
    )
    with step_bar("simulating transactions") as update:
        frame = simulate(cfg, progress=update)
    with spinner(f"writing {out}"):
        write_table(frame, out)
    n_fraud = int(frame["is_fraud"].sum())
    err_console.print(
        f"{frame.height:,} transactions, {n_fraud:,} fraud "
        f"({n_fraud / max(frame.height, 1):.2%}) -> {out}"
    )


features_app = typer.Typer(
    help="Build point-in-time features from a transaction log (see `features spec`).",
    no_args_is_help=False,
    invoke_without_command=True,
)


@features_app.callback()
@handle_errors
def features(
    ctx: typer.Context,
    input: str = typer.Option(
        None, "--input", help="Transaction log: a .csv or .parquet file, a folder, or a glob."
    ),
    out: Path = typer.Option(None, "--out", help="Feature table to write (.parquet)."),
    spec_file: Path = typer.Option(
        None,
        "--spec",
        help="Feature spec (TOML); without it, the default spec (`fraudflow features spec`).",
    ),
    map: str = typer.Option(
        None, "--map", help="Column mapping canonical=source,... e.g. timestamp=TX_DATETIME."
    ),
    label_delay_days: int = typer.Option(
        None, "--label-delay-days", help="Days until a fraud label is known [7; default spec]."
    ),
    shard_days: int = typer.Option(
        None, "--shard-days", help="Write a folder of shards, one per N days, to --out."
    ),
    engine: str = typer.Option("polars", "--engine", help="polars (one machine) or spark."),
    spark_master: str = typer.Option(
        "local[*]", "--spark-master", help="Spark master URL for --engine spark."
    ),
    spark_conf: list[str] = typer.Option(
        [], "--spark-conf", help="Spark setting KEY=VALUE for --engine spark (repeatable)."
    ),
    memory_limit: str = typer.Option(
        None,
        "--memory-limit",
        help="Memory the Polars engine may use, e.g. 16GiB [default: what is available].",
    ),
) -> None:
    """Build point-in-time features from a transaction log."""
    if ctx.invoked_subcommand is not None:
        return
    if input is None or out is None:
        raise ConfigError("fraudflow features needs --input and --out")
    from fraudflow.data.ingest import parse_column_map, read_transaction_files
    from fraudflow.features import (
        build_features,
        check_categorical,
        check_input,
        default_spec,
        load_spec,
        write_feature_shards,
        write_feature_table,
    )
    from fraudflow.features.memory import check_memory, parse_size

    if engine not in ("polars", "spark"):
        raise ConfigError(f"--engine must be polars or spark, however got {engine!r}")
    if memory_limit is not None and engine == "spark":
        raise ConfigError("--memory-limit is for the Polars engine; Spark takes --spark-conf")
    limit = None if memory_limit is None else parse_size(memory_limit)

    spec = None
    if spec_file is not None:
        if label_delay_days is not None:
            raise ConfigError(
                "--label-delay-days is for the default spec; set label_delay in --spec"
            )
        spec = load_spec(spec_file)
        cfg = FeatureConfig(label_delay_days=spec.label_delay_days)
    else:
        cfg = FeatureConfig(label_delay_days=7 if label_delay_days is None else label_delay_days)
    column_map = parse_column_map(map)
    if shard_days is None and out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out must be a .parquet file, however got {out}")
    if engine == "spark":
        _backfill(
            input, spec or default_spec(cfg), out, column_map, shard_days, spark_master, spark_conf
        )
        return
    with spinner(f"reading and validating {input}"):
        transactions = read_transaction_files(input, column_map=column_map)
    if spec is not None:
        check_input(spec, transactions.columns)  # before the work: a bad spec fails at once
        check_categorical(spec, transactions.schema)
    spec = spec or default_spec(cfg)
    added = [name for name in spec.feature_names if name not in transactions.columns]
    check_memory(transactions.height, len(transactions.columns) + len(added), limit=limit)
    with spinner(f"building features for {transactions.height:,} transactions"):
        table = build_features(transactions, spec)
    with spinner(f"writing {out}"):
        if shard_days is None:
            write_feature_table(table, out, cfg, spec=spec)
        else:
            write_feature_shards(table, out, cfg, shard_days=shard_days, spec=spec)
    err_console.print(f"{table.height:,} rows x {len(table.columns)} columns -> {out}")


def _backfill(
    input: str,
    spec: Any,
    out: Path,
    column_map: dict[str, str],
    shard_days: int | None,
    master: str,
    conf: list[str],
) -> None:
    """The Spark engine: executors read, check, compute and (with shards) write."""
    from fraudflow.features.spark_backfill import backfill_on_spark

    settings = {}
    for item in conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--spark-conf expects KEY=VALUE, however got {item!r}")
        settings[key.strip()] = value
    with spinner(f"building features of {input} on Spark ({master})"):
        done = backfill_on_spark(
            input, spec, out, column_map=column_map, shard_days=shard_days,
            master=master, conf=settings,
        )  # fmt: skip
    err_console.print(
        f"{done.rows:,} rows from {done.inputs} file(s) -> {out} ({len(done.files)} file(s))"
    )


@features_app.command("spec")
@handle_errors
def write_spec(
    out: Path = typer.Option(..., "--out", help="Where to write the spec (.toml)."),
    label_delay_days: int = typer.Option(
        7, "--label-delay-days", help="Days until a label is known."
    ),
    v2: bool = typer.Option(
        False,
        "--v2",
        help="With the v2 block (the service computes it with its spec engine, slower than "
        "the default spec's fast path).",
    ),
) -> None:
    """Write the default feature spec, a starting point for your own."""
    from fraudflow.features import default_spec, spec_to_toml
    from fraudflow.files import write_text_atomic

    cfg = FeatureConfig(label_delay_days=label_delay_days)
    text = spec_to_toml(default_spec(cfg, v2=v2))
    write_text_atomic(out, text)
    err_console.print(f"the default feature spec -> {out}")
