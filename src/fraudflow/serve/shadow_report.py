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

__all__ = ["shadow_verdicts", "unscored", "write_shadow_report"]

_DECISION = ("transaction_id", "customer_id", "amount", "decided_at")
# A labelled decision's fields (``_DECISION`` and ``is_fraud``) and its ``shadow`` object.
_Labelled = list[tuple[dict[str, Any], dict[str, Any]]]


def shadow_verdicts(audit: Path, *, since: date | None = None) -> pl.DataFrame:
    """One row per (labelled decision, model that scored it) of the audit log ``audit``
    (``fraudflow.eval.shadow.VERDICT_COLUMNS``), decided on or after ``since`` (UTC)."""
    return _verdicts(_labelled(audit, since))


def unscored(audit: Path, *, since: date | None = None) -> dict[str, dict[str, int]]:
    """Per challenger version, how many of the labelled decisions (as ``shadow_verdicts``) it
    did not score, by status: ``error``, ``timed_out``, ``busy``, or ``missing`` (its verdict
    was never recorded: the process died between the answer and the shadow commit)."""
    return _unscored(_labelled(audit, since))


def _labelled(audit: Path, since: date | None) -> _Labelled:
    decisions = read_decisions(audit)  # the verdicts recorded apart joined to their decisions
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
    return [
        (dict(zip(_DECISION, fields, strict=True)) | {"is_fraud": is_fraud}, orjson.loads(text))
        for *fields, is_fraud, text in labelled.select(*_DECISION, "is_fraud", "shadow").rows()
    ]


def _verdicts(labelled: _Labelled) -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    for base, entry in labelled:
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


def _unscored(labelled: _Labelled) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for _, entry in labelled:
        for challenger in entry["challengers"]:
            counts = out.setdefault(challenger["model_version"], {})
            if challenger["status"] != "ok":
                counts[challenger["status"]] = counts.get(challenger["status"], 0) + 1
    return {version: dict(sorted(counts.items())) for version, counts in out.items()}


def _verdict(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("model_version", "score", "decision")}


def write_shadow_report(
    audit: Path, out: Path, *, since: date | None = None, json_out: Path | None = None
) -> dict[str, Any]:
    """Write the report to ``out`` (HTML) and ``json_out`` (default: ``out`` with ``.json``);
    return its figures: ``compare_shadow``'s, and ``unscored``."""
    if Path(out).suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out must be an .html file, however got {out}")
    json_path = Path(json_out) if json_out is not None else Path(out).with_suffix(".json")
    labelled = _labelled(audit, since)
    report = compare_shadow(_verdicts(labelled)) | {"unscored": _unscored(labelled)}
    report = {"audit": str(audit), "since": None if since is None else since.isoformat()} | report
    write_bytes_atomic(json_path, orjson.dumps(report, option=orjson.OPT_INDENT_2))
    write_text_atomic(out, render_shadow_html(report))
    return report
