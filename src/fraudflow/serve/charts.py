"""Small server-rendered charts for the review console: inline SVG, no script, no assets.

The SVG uses classes styled by ``static/console.css`` (the console's Content-Security-Policy
allows no inline style), and every text it holds is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from markupsafe import Markup, escape

from fraudflow.serve.cases import Decided

__all__ = ["amounts_chart"]

_US = 1_000_000
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 8, 8, 22  # margins for the axis labels


def amounts_chart(
    points: Sequence[Decided], *, current: str, width: int = 560, height: int = 150
) -> Markup:
    """Amounts over time, one dot per transaction coloured by its decision (a ring: labelled
    fraud), the transaction ``current`` drawn larger; empty when there is nothing to draw."""
    if not points:
        return Markup("")
    t0, t1 = min(p.t_us for p in points), max(p.t_us for p in points)
    top = max(max(p.amount for p in points), 1e-9)
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def x(t_us: int) -> float:
        return _LEFT + (plot_w / 2 if t1 == t0 else (t_us - t0) / (t1 - t0) * plot_w)

    def y(amount: float) -> float:
        return _TOP + plot_h - max(amount, 0.0) / top * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="amounts of the card\'s {len(points)} transactions over time">',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{width - _RIGHT}" '
        f'y2="{_TOP + plot_h}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}"/>',
        f'<text class="tick" x="{_LEFT - 4}" y="{_TOP + 8}" text-anchor="end">{top:,.0f}</text>',
        f'<text class="tick" x="{_LEFT - 4}" y="{_TOP + plot_h}" text-anchor="end">0</text>',
        f'<text class="tick" x="{_LEFT}" y="{height - 6}">{_tick(t0, t1 - t0)}</text>',
        f'<text class="tick" x="{width - _RIGHT}" y="{height - 6}" text-anchor="end">'
        f"{_tick(t1, t1 - t0)}</text>",
    ]
    ordered = sorted(points, key=lambda p: p.transaction_id == current)  # current on top
    for p in ordered:
        classes = f"dot {escape(p.decision)}" + (" fraud" if p.is_fraud else "")
        r = 6 if p.transaction_id == current else 3.5
        if p.transaction_id == current:
            classes += " current"
        title = escape(f"{p.transaction_id}: {p.amount:,.2f}, {p.decision}, {_day(p.t_us)}")
        parts.append(
            f'<circle class="{classes}" cx="{x(p.t_us):.1f}" cy="{y(p.amount):.1f}" r="{r}">'
            f"<title>{title}</title></circle>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # built from numbers and escaped text


def _day(t_us: int) -> str:
    return datetime.fromtimestamp(t_us / _US, UTC).strftime("%Y-%m-%d")


def _tick(t_us: int, span_us: int) -> str:
    """The day; with the time when the chart spans under two days."""
    at = datetime.fromtimestamp(t_us / _US, UTC)
    return at.strftime("%Y-%m-%d" if span_us >= 2 * 86_400 * _US else "%Y-%m-%d %H:%M")
