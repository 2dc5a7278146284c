"""`fraudflow shadow report`'s reading and writing: the audit log's challenger verdicts on the
decisions whose labels have arrived, compared by ``fraudflow.eval.shadow``, written as HTML and
JSON (each atomically)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from fraudflow.errors import ConfigError
from fraudflow.eval.shadow import compare_shadow, render_shadow_html
from fraudflow.files import write_bytes_atomic, write_text_atomic
from fraudflow.serve.audit import read_decisions, read_labels

__all__ = ["shadow_verdicts", "write_shadow_report"]

_DECISION = ("transaction_id", "customer_id", "amount", "decided_at")


def shadow_verdicts(audit: Path, *, since: date | None = None) -> pl.DataFrame:
    """One row per (labelled decision, model that scored it) of the audit log ``audit``
    (``fraudflow.eval.shadow.VERDICT_COLUMNS``), decided on or after ``since`` (UTC)."""
    decisions = read_decisions(audit)
    if "shadow" not in decisions.columns:
        raise ConfigError(
            f"audit log {audit} records no challenger verdicts: serve with --shadow RUN first"
        )
    decisions = decisions.filter(pl.col("shadow").is_not_null())
    if since is not None:
        start = datetime(since.year, since.month, since.day, tzinfo=UTC)
        decisions = decisions.filter(pl.col("decided_at") >= start)
    # The latest report of each label wins (read_labels is in arrival order).
    labels = read_labels(audit).group_by("transaction_id", maintain_order=True).last()
    labelled = decisions.join(
        labels.select("transaction_id", "is_fraud"), on="transaction_id", maintain_order="left"
    )
    rows: list[dict[str, Any]] = []
    for *fields, is_fraud, text in labelled.select(*_DECISION, "is_fraud", "shadow").rows():
        base = dict(zip(_DECISION, fields, strict=True)) | {"is_fraud": is_fraud}
        entry = orjson.loads(text)
        rows.append(base | {"role": "champion", **_verdict(entry["champion"])})
        for challenger in entry["challengers"]:
            if challenger["status"] == "ok":
                rows.append(base | {"role": "challenger", **_verdict(challenger)})
    schema: dict[str, pl.DataType] = {
        "transaction_id": pl.String(), "customer_id": pl.String(), "amount": pl.Float64(),
        "decided_at": pl.Datetime("us", "UTC"), "is_fraud": pl.Int8(), "role": pl.String(),
        "model_version": pl.String(), "score": pl.Float64(), "decision": pl.String(),
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _verdict(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("model_version", "score", "decision")}


def write_shadow_report(
    audit: Path, out: Path, *, since: date | None = None, json_out: Path | None = None
) -> dict[str, Any]:
    """Write the report to ``out`` (HTML) and ``json_out`` (default: ``out`` with ``.json``);
    return its figures."""
    if Path(out).suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out must be an .html file, however got {out}")
    json_path = Path(json_out) if json_out is not None else Path(out).with_suffix(".json")
    report = compare_shadow(shadow_verdicts(audit, since=since))
    report = {"audit": str(audit), "since": None if since is None else since.isoformat()} | report
    write_bytes_atomic(json_path, orjson.dumps(report, option=orjson.OPT_INDENT_2))
    write_text_atomic(out, render_shadow_html(report))
    return report
