"""The champion against each challenger on labelled live decisions: the shadow report.

Input: one row per (decision, model) that scored it (``VERDICT_COLUMNS``): the decision's
``transaction_id``, ``customer_id``, ``amount``, ``decided_at`` (UTC) and arrived label
``is_fraud``, then the model's ``model_version``, ``role`` (``champion``: it decided, or would
have but for the split; ``challenger``), ``score`` and ``decision``. ``fraudflow.serve`` builds
it from the audit log; this module only computes.

Each champion-challenger pair is compared on the decisions both scored (a challenger that
failed or was late on a decision leaves it out of its pair). Per model:

* ``average_precision`` of its scores (``fraudflow.eval.metrics.average_precision``);
* precision and recall at the policy thresholds, from the decisions its own policy made:
  ``*_at_review`` counts review or block as flagged, ``*_at_block`` block alone
  (scikit-learn's ``precision_score`` / ``recall_score``; 0 where nothing is flagged);
* ``reviews_per_day``: its review decisions per UTC day of the decision.

Per pair: the agreement matrix (rows: the champion's decision, columns: the challenger's),
the share of decisions on which they agree, and the frauds one flagged (review or block) and
the other approved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

import polars as pl
from sklearn.metrics import precision_score, recall_score

from fraudflow.eval.metrics import average_precision

__all__ = ["ACTIONS", "VERDICT_COLUMNS", "compare_shadow", "render_shadow_html"]

ACTIONS = ("approve", "review", "block")
VERDICT_COLUMNS = (
    "transaction_id", "customer_id", "amount", "decided_at", "is_fraud", "model_version", "role",
    "score", "decision",
)  # fmt: skip
_MISSED_LISTED = 100  # per pair and side: the largest-amount frauds first


def compare_shadow(verdicts: pl.DataFrame) -> dict[str, Any]:
    """The report's figures (see the module docstring) as a JSON-ready dict."""
    missing = [c for c in VERDICT_COLUMNS if c not in verdicts.columns]
    if missing:
        raise ValueError(f"shadow verdicts need columns {missing}")
    champions = verdicts.filter(pl.col("role") == "champion")
    challengers = verdicts.filter(pl.col("role") == "challenger")
    pairs = (
        challengers.join(champions, on="transaction_id", suffix="_champion")
        .select("model_version_champion", "model_version")
        .unique(maintain_order=True)
        .rows()
    )
    return {
        "decisions": champions.height,
        "frauds": int(champions["is_fraud"].sum() or 0),
        "pairs": [_pair(champions, challengers, c, v) for c, v in pairs],
    }


def _pair(
    champions: pl.DataFrame, challengers: pl.DataFrame, champion: str, challenger: str
) -> dict[str, Any]:
    ours = champions.filter(pl.col("model_version") == champion)
    theirs = challengers.filter(pl.col("model_version") == challenger).select(
        "transaction_id", pl.col("score").alias("challenger_score"),
        pl.col("decision").alias("challenger_decision"),
    )  # fmt: skip
    both = ours.join(theirs, on="transaction_id", maintain_order="left")
    agree = both.filter(pl.col("decision") == pl.col("challenger_decision")).height
    return {
        "champion": champion,
        "challenger": challenger,
        "decisions": both.height,
        "frauds": int(both["is_fraud"].sum() or 0),
        "models": {
            champion: _model_figures(both, "score", "decision"),
            challenger: _model_figures(both, "challenger_score", "challenger_decision"),
        },
        "agreement": _agreement(both),
        "agreement_rate": agree / both.height if both.height else None,
        "caught_by_champion_only": _caught_only(both, "decision", "challenger_decision"),
        "caught_by_challenger_only": _caught_only(both, "challenger_decision", "decision"),
    }


def _model_figures(frame: pl.DataFrame, score: str, decision: str) -> dict[str, Any]:
    y = frame["is_fraud"].to_numpy()
    actions = frame[decision]
    flagged = actions.is_in(["review", "block"]).to_numpy()
    blocked = (actions == "block").to_numpy()
    per_day = (
        frame.filter(pl.col(decision) == "review")
        .group_by(pl.col("decided_at").dt.date().alias("day"))
        .len()
        .sort("day")
    )
    return {
        "average_precision": _finite(average_precision(y, frame[score].to_numpy())),
        "precision_at_review": _precision(y, flagged),
        "recall_at_review": _recall(y, flagged),
        "precision_at_block": _precision(y, blocked),
        "recall_at_block": _recall(y, blocked),
        "reviews_per_day": {str(day): n for day, n in per_day.rows()},
    }


def _precision(y: Any, flagged: Any) -> float:
    return float(precision_score(y, flagged, zero_division=0.0))


def _recall(y: Any, flagged: Any) -> float:
    return float(recall_score(y, flagged, zero_division=0.0))


def _agreement(frame: pl.DataFrame) -> dict[str, dict[str, int]]:
    """{champion's decision: {challenger's decision: decisions}}, every action present."""
    counts = frame.group_by("decision", "challenger_decision").len().rows()
    out = {a: dict.fromkeys(ACTIONS, 0) for a in ACTIONS}
    for ours, theirs, n in counts:
        out[ours][theirs] = n
    return out


def _caught_only(frame: pl.DataFrame, caught: str, missed: str) -> dict[str, Any]:
    """The frauds ``caught`` flagged (review or block) and ``missed`` approved: how many, and
    the largest of them by amount."""
    rows = frame.filter(
        (pl.col("is_fraud") == 1) & (pl.col(caught) != "approve") & (pl.col(missed) == "approve")
    ).sort("amount", descending=True, maintain_order=True)
    columns: Sequence[str] = ("transaction_id", "customer_id", "amount", "score",
                              "challenger_score")  # fmt: skip
    listed = [
        {**dict(zip(columns, row, strict=True)), "decided_at": at.isoformat()}
        for *row, at in rows.select(*columns, "decided_at").head(_MISSED_LISTED).rows()
    ]
    return {"count": rows.height, "frauds": listed}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


# --- HTML ---------------------------------------------------------------------------------


def render_shadow_html(report: dict[str, Any], *, title: str = "Champion and challengers") -> str:
    """The report as one self-contained HTML page: per pair, the models' figures, the
    agreement matrix and the frauds one caught and the other missed."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>",
        f"<p>{report['decisions']:,} labelled decisions, {report['frauds']:,} frauds.</p>",
    ]
    if not report["pairs"]:
        parts.append("<p>No challenger scored any of them.</p>")
    for pair in report["pairs"]:
        parts += _pair_html(pair)
    # Per challenger, the labelled decisions it did not score, by status (missing: its verdict
    # was never recorded); present when fraudflow.serve builds the report.
    for version, counts in report.get("unscored", {}).items():
        listed = ", ".join(f"{escape(status)} {n:,}" for status, n in counts.items()) or "none"
        parts.append(f"<p>Not scored by {escape(version)}: {listed}.</p>")
    return "".join([*parts, "</body></html>"])


_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
)
_FIGURES = (
    ("average_precision", "Average precision"),
    ("precision_at_review", "Precision at review"),
    ("recall_at_review", "Recall at review"),
    ("precision_at_block", "Precision at block"),
    ("recall_at_block", "Recall at block"),
)


def _pair_html(pair: dict[str, Any]) -> list[str]:
    champion, challenger = pair["champion"], pair["challenger"]
    models = [champion, challenger]
    rate = pair["agreement_rate"]
    out = [
        f"<h2>{escape(champion)} (champion) vs {escape(challenger)}</h2>",
        f"<p>{pair['decisions']:,} decisions both scored, {pair['frauds']:,} frauds; "
        f"decisions agree on {_number(rate)}.</p>",
        "<table><tr><th></th>",
        *(f"<th>{escape(m)}</th>" for m in models),
        "</tr>",
    ]
    for key, label in _FIGURES:
        cells = "".join(f"<td>{_number(pair['models'][m][key])}</td>" for m in models)
        out.append(f"<tr><th>{label}</th>{cells}</tr>")
    out.append("</table><h3>Reviews per day</h3>")
    days = sorted({d for m in models for d in pair["models"][m]["reviews_per_day"]})
    out += ["<table><tr><th>day</th>", *(f"<th>{escape(m)}</th>" for m in models), "</tr>"]
    for day in days:
        cells = "".join(
            f"<td>{pair['models'][m]['reviews_per_day'].get(day, 0)}</td>" for m in models
        )
        out.append(f"<tr><th>{day}</th>{cells}</tr>")
    out.append(
        "</table><h3>Agreement (rows: champion, columns: challenger)</h3><table><tr><th></th>"
    )
    out += [f"<th>{a}</th>" for a in ACTIONS] + ["</tr>"]
    for ours in ACTIONS:
        cells = "".join(f"<td>{pair['agreement'][ours][theirs]}</td>" for theirs in ACTIONS)
        out.append(f"<tr><th>{ours}</th>{cells}</tr>")
    out.append("</table>")
    for key, who in (
        ("caught_by_champion_only", champion),
        ("caught_by_challenger_only", challenger),
    ):
        caught = pair[key]
        out.append(f"<h3>Frauds only {escape(who)} caught: {caught['count']:,}</h3>")
        if caught["frauds"]:
            out.append(
                "<table><tr><th>transaction</th><th>customer</th><th>amount</th>"
                "<th>champion score</th><th>challenger score</th><th>decided at</th></tr>"
            )
            for f in caught["frauds"]:
                out.append(
                    f"<tr><td>{escape(str(f['transaction_id']))}</td>"
                    f"<td>{escape(str(f['customer_id']))}</td><td>{f['amount']:.2f}</td>"
                    f"<td>{f['score']:.4f}</td><td>{f['challenger_score']:.4f}</td>"
                    f"<td>{escape(f['decided_at'])}</td></tr>"
                )
            out.append("</table>")
    return out


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
