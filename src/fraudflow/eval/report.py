"""Compare finished runs in one self-contained HTML report.

A run folder holds ``metrics.json`` (the numbers training reported) and ``predictions.parquet``
(the test-set scores, see ``fraudflow.eval.metrics``). The report shows a comparison table with
the best value of each column highlighted, a table per fraud scenario when metrics.json has
``per_scenario`` (``fraudflow.eval.scenarios``), precision-recall and ROC curves, card
precision@100 per test day and per-class score histograms. Rows with ``known_compromised``
true are left out of every curve, as they are out of the metrics.

The file opens offline: CSS is inline, images are base64 PNG data URIs, there are no scripts
and no links. It is written atomically, so an error leaves no partial report behind.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# The object-oriented Figure API instead of pyplot: no global backend switch, no display needed,
# and no pyplot figure registry to leak figures into (matplotlib's "embedding in a web
# application server" recipe). savefig(format="png") renders with Agg.
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from fraudflow.errors import ArtifactError, ConfigError
from fraudflow.eval.metrics import (
    PREDICTION_COLUMNS,
    average_precision,
    drop_known_compromised,
    metrics_from_predictions,
    roc_auc,
)
from fraudflow.files import write_text_atomic

__all__ = [
    "TABLE_COLUMNS",
    "Column",
    "RunResult",
    "best_values",
    "comparison_table",
    "load_run",
    "write_report",
]


@dataclass(frozen=True)
class RunResult:
    """One finished run: its folder name, its metrics.json and its predictions table."""

    name: str
    metrics: dict[str, Any]
    predictions: pl.DataFrame = field(repr=False)


@dataclass(frozen=True)
class Column:
    """A metric column of the comparison table; ``decimals`` is for display only."""

    key: str
    label: str
    higher_is_better: bool
    decimals: int


TABLE_COLUMNS: tuple[Column, ...] = (
    Column("roc_auc", "ROC AUC", True, 4),
    Column("average_precision", "AP", True, 4),
    Column("card_precision_at_100", "Card precision@100", True, 4),
    Column("recall_at_1pct_fpr", "Recall@1% FPR", True, 4),
    Column("train_seconds", "Train seconds", False, 1),
    Column("train_samples_per_second", "Samples/s", True, 0),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
td.best { background: #d8f0d8; font-weight: bold; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1.5rem; }
p.note { color: #555; font-size: 0.9rem; }
"""


def load_run(run_dir: Path | str) -> RunResult:
    """Read a run folder; ``ArtifactError`` names the file that is missing or unreadable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder {run_dir} does not exist or is not a folder")
    metrics = _read_metrics(run_dir / "metrics.json")
    predictions = _read_predictions(run_dir / "predictions.parquet")
    return RunResult(run_dir.resolve().name, metrics, predictions)


def comparison_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per run: ``name``, ``model`` and each ``TABLE_COLUMNS`` key.

    A value missing from metrics.json, or not a finite number, is ``None``.
    """
    return [
        {
            "name": run.name,
            "model": str(run.metrics.get("model", "")),
            **{col.key: _finite_or_none(run.metrics.get(col.key)) for col in TABLE_COLUMNS},
        }
        for run in runs
    ]


def best_values(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The best value of each ``TABLE_COLUMNS`` column (ties: all equal cells are best)."""
    best: dict[str, float] = {}
    for col in TABLE_COLUMNS:
        values = [row[col.key] for row in rows if row[col.key] is not None]
        if values:
            best[col.key] = max(values) if col.higher_is_better else min(values)
    return best


def write_report(
    run_dirs: Sequence[Path | str], out: Path | str, *, title: str = "fraudflow report"
) -> Path:
    """Write the HTML report comparing ``run_dirs`` to ``out`` and return ``out``.

    Every run is read and every figure drawn before anything is written, so an error leaves
    ``out`` as it was.
    """
    if not run_dirs:
        raise ConfigError("a report needs at least one run folder, however: none were given")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    write_text_atomic(out, _render_html(runs, title))
    return out


# --- reading ---------------------------------------------------------------------------------


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: a run folder must contain metrics.json")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path} must hold a JSON object, however: it holds {type(metrics)}")
    return metrics


def _read_predictions(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: a run folder must contain predictions.parquet")
    try:
        pred = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in pred.columns]
    if missing:
        raise ArtifactError(f"{path} lacks the prediction columns {missing}")
    return pred


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# --- HTML ------------------------------------------------------------------------------------


def _render_html(runs: Sequence[RunResult], title: str) -> str:
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Comparison</h2>",
        _table_html(comparison_table(runs)),
        '<p class="note">Metrics as recorded in each run\'s metrics.json. Curves below use the '
        "test predictions without the cards known to be compromised before the test period.</p>",
        *_scenario_section(runs),
        "<h2>Precision-recall</h2>",
        _img(_pr_figure(runs), "precision-recall curves"),
        "<h2>ROC</h2>",
        _img(_roc_figure(runs), "ROC curves"),
        "<h2>Card precision@100 per test day</h2>",
        _img(_card_precision_figure(runs), "card precision@100 per test day"),
        "<h2>Score distributions</h2>",
        *(_img(_histogram_figure(run), f"score histogram of {run.name}") for run in runs),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _table_html(rows: Sequence[dict[str, Any]]) -> str:
    best = best_values(rows)
    labels = ["Run", "Model", *(col.label for col in TABLE_COLUMNS)]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = "".join(f"<tr>{_row_html(row, best)}</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _row_html(row: dict[str, Any], best: dict[str, float]) -> str:
    cells = [f"<td>{html.escape(row['name'])}</td>", f"<td>{html.escape(row['model'])}</td>"]
    for col in TABLE_COLUMNS:
        value = row[col.key]
        text = "n/a" if value is None else f"{value:,.{col.decimals}f}"
        css = ' class="best"' if value is not None and value == best.get(col.key) else ""
        cells.append(f"<td{css}>{html.escape(text)}</td>")
    return "".join(cells)


def _scenario_section(runs: Sequence[RunResult]) -> list[str]:
    """A table row per run and fraud scenario; nothing when no run recorded scenarios."""
    rows = [
        (run, name, values)
        for run in runs
        for name, values in (run.metrics.get("per_scenario") or {}).items()
    ]
    if not rows:
        return []
    labels = ["Run", "Scenario", "Frauds", "Recall at review threshold", "AP", "Threshold"]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = "".join(f"<tr>{_scenario_row(*row)}</tr>\n" for row in rows)
    return [
        "<h2>Per fraud scenario</h2>",
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>",
        "<p class=\"note\">Each scenario's test frauds: the share scored at or above the run's "
        "review threshold (chosen on validation for its review budget of cards a day), and "
        "the average precision of those frauds against all legitimate test rows.</p>",
    ]


def _scenario_row(run: RunResult, name: str, values: dict[str, Any]) -> str:
    cells = [
        run.name,
        name,
        _number(values.get("n_fraud"), 0),
        _number(values.get("recall_at_review_threshold"), 4),
        _number(values.get("average_precision"), 4),
        _number(run.metrics.get("review_threshold"), 4),
    ]
    return "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)


def _number(value: Any, decimals: int) -> str:
    finite = _finite_or_none(value)
    return "n/a" if finite is None else f"{finite:,.{decimals}f}"


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    # No "Software" metadata: the PNG then carries no URL at all.
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# --- figures ---------------------------------------------------------------------------------


def _labels_scores(run: RunResult) -> tuple[np.ndarray, np.ndarray]:
    pred = drop_known_compromised(run.predictions)
    return pred["is_fraud"].to_numpy().astype(np.int64), pred["score"].to_numpy().astype(float)


def _new_axes() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.0, 4.5))
    return fig, fig.subplots()


def _pr_figure(runs: Sequence[RunResult]) -> Figure:
    fig, ax = _new_axes()
    for run in runs:
        y, s = _labels_scores(run)
        if math.isnan(ap := average_precision(y, s)):
            continue  # a single class has no PR curve
        precision, recall, _ = precision_recall_curve(y, s, drop_intermediate=True)
        ax.plot(recall, precision, label=f"{run.name} (AP {ap:.4f})", drawstyle="steps-post")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    _legend(ax)
    return fig


def _roc_figure(runs: Sequence[RunResult]) -> Figure:
    # Log FPR axis: fraud teams operate at FPR well below 1%, which a linear axis squashes.
    fig, ax = _new_axes()
    for run in runs:
        y, s = _labels_scores(run)
        if math.isnan(auc := roc_auc(y, s)):
            continue
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=True)
        keep = fpr > 0  # log scale: the (0, 0) corner cannot be drawn
        ax.plot(fpr[keep], tpr[keep], label=f"{run.name} (AUC {auc:.4f})", drawstyle="steps-post")
    ax.axvline(0.01, color="grey", linestyle=":", linewidth=1, label="FPR 1%")
    ax.set_xscale("log")
    ax.set(xlabel="false-positive rate (log)", ylabel="true-positive rate", ylim=(0, 1.02))
    _legend(ax)
    return fig


def _card_precision_figure(runs: Sequence[RunResult]) -> Figure:
    fig, ax = _new_axes()
    for run in runs:
        per_day = _per_day_card_precision(run)
        if per_day:
            days = np.arange(1, len(per_day) + 1)
            ax.plot(days, per_day, marker="o", markersize=3, label=run.name)
    ax.set(xlabel="test day", ylabel="card precision@100", ylim=(0, 1.02))
    _legend(ax)
    return fig


def _per_day_card_precision(run: RunResult) -> list[float]:
    """From metrics.json when training recorded it, else recomputed from the predictions."""
    recorded = run.metrics.get("card_precision_at_100_per_day")
    if isinstance(recorded, list):
        return [float(v) for v in recorded]
    return list(metrics_from_predictions(run.predictions)["card_precision_at_100_per_day"])


def _histogram_figure(run: RunResult) -> Figure:
    fig, ax = _new_axes()
    y, s = _labels_scores(run)
    # Bins span [0, 1], widened if a score falls outside the contract's range.
    bins = np.linspace(float(s.min(initial=0.0)), float(s.max(initial=1.0)), 51).tolist()
    for label, name in ((0, "legitimate"), (1, "fraud")):
        if np.any(y == label):
            ax.hist(s[y == label], bins=bins, log=True, alpha=0.6, label=f"{name} ({label})")
    ax.set(title=run.name, xlabel="score", ylabel="transactions (log)")
    _legend(ax)
    return fig


def _legend(ax: Axes) -> None:
    # matplotlib warns when asked for a legend with nothing labelled (e.g. single-class runs).
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
