"""Features as data: the spec that declares them, once, for every engine.

A spec is a TOML file (``load_spec``) or the shipped default (``fraudflow.features.default_spec``):

    label_delay = "7d"                 # a fraud label is known this long after its transaction
    features = ["...", ...]            # optional: the model's features, in order (default: all)

    [[aggregate]]                      # features named {name}__{window}
    name = "card_category__mean_amount"
    by = ["customer_id", "category"]   # key columns: canonical or any extra column of the log
    fn = "mean"                        # see FUNCTIONS
    of = "amount"                      # the value column (count_distinct: the column counted)
    where = "amount < 5"               # optional row filter (an expression over the row)
    windows = ["1h", "30d", "last 5"]  # durations (s, m, h, d, w) or the last N events
    delayed = false                    # true: the window ends label_delay before the row
    default = 0.0                      # optional: the value of an empty window, where it is null
    unit = "h"                         # time_since_* only: s (default), m, h or d
    k = 3.0                            # count_above only: the factor (below)
    typical = "30d"                    # count_above only: the window of the typical value

    [[derive]]                         # an expression over features and the row (expressions.py)
    name = "customer__amount_ratio__30d"
    expr = "where(customer__mean_amount__30d > 0, amount / customer__mean_amount__30d, 1)"

    [[column]]                         # the row's own column as a feature
    name = "merchant_risk"
    kind = "numeric"

    [[column]]
    name = "merchant_category"
    kind = "categorical"               # strings, integers or booleans; models see integer codes
    max_categories = 50                # optional: only the most frequent values get own codes

Point in time, in every engine: a row's window holds rows at or before it (equal timestamps:
the earlier input rows and itself, never later ones); ``fraud_count`` and ``fraud_rate`` read
labels, so their windows are always delayed, (t - delay - w, t - delay], where every label is
known at t (Le Borgne et al., Fraud Detection Handbook, ch. 3.4). Empty windows: ``count``,
``sum``, ``count_distinct`` and ``fraud_count`` are 0; the others are null unless ``default``.
``std`` is the population standard deviation. ``time_since_last`` is the time since the key's
previous matching row (not the row itself) inside the window; ``time_since_first`` the time
since the window's earliest matching row (the row itself included: a key's first row gives 0,
so over a long window it is the card's age); ``time_since_fraud`` reads labels (delayed
duration windows): the time since the latest matching row of the window known to be fraud.

``count_above`` counts the window's rows whose value is above ``k`` times the key's typical
value as of that row: the mean of ``of`` over the key's matching rows in the ``typical``
window ending just before the row (time in (t - typical, t], arrived before it, the row itself
left out). A row with no such earlier rows has no typical value and is not counted. Each row's
verdict is fixed by the rows before it, so every engine computes it from the same rows, as
``value > k * (sum / count)``; windows and ``typical`` are durations, never delayed. (Sums of
non-integer values round differently in each engine: a value within rounding of k times the
mean may be judged differently; whole amounts, or cents as integers, are summed exactly.)

A categorical column is output as the row's own value; the trainer maps its values to integer
codes learned on the training rows (``fraudflow.features.categories``), stored in the bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraudflow.errors import ConfigError
from fraudflow.features.expressions import CALENDAR, Expr, parse_expression, referenced_names

__all__ = [
    "FUNCTIONS",
    "KINDS",
    "Aggregate",
    "Column",
    "Derive",
    "FeatureSpec",
    "Window",
    "load_spec",
    "parse_spec",
    "spec_to_toml",
]

FUNCTIONS = (
    "count", "sum", "mean", "min", "max", "std", "count_distinct", "time_since_last",
    "time_since_first", "fraud_count", "fraud_rate", "time_since_fraud", "count_above",
)  # fmt: skip
NEEDS_VALUE = frozenset({"sum", "mean", "min", "max", "std", "count_distinct", "count_above"})
READS_LABELS = frozenset({"fraud_count", "fraud_rate", "time_since_fraud"})
TIME_FUNCTIONS = frozenset({"time_since_last", "time_since_first", "time_since_fraud"})
ZERO_WHEN_EMPTY = frozenset({"count", "sum", "count_distinct", "fraud_count", "count_above"})
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_LAST = re.compile(r"^last\s*([1-9][0-9]*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AGGREGATE_KEYS = {
    "name", "by", "fn", "of", "where", "windows", "delayed", "default", "unit", "k", "typical",
}  # fmt: skip


@dataclass(frozen=True)
class Window:
    """A duration (``seconds``) or the last ``events`` events of the key."""

    label: str  # as in the feature name: "1h", "30d", "last5"
    seconds: int | None = None
    events: int | None = None


@dataclass(frozen=True)
class Aggregate:
    name: str
    by: tuple[str, ...]
    fn: str
    windows: tuple[Window, ...]
    of: str | None = None
    where: str | None = None
    delayed: bool = False
    default: float | None = None
    unit: str = "s"
    k: float | None = None  # count_above: the factor
    typical: Window | None = None  # count_above: the window of the typical value

    def feature_name(self, window: Window) -> str:
        return f"{self.name}__{window.label}"

    @property
    def where_expr(self) -> Expr | None:
        return None if self.where is None else parse_expression(self.where)


@dataclass(frozen=True)
class Derive:
    name: str
    expr: str

    @property
    def tree(self) -> Expr:
        return parse_expression(self.expr)


KINDS = ("numeric", "categorical")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of KINDS
    # categorical only: codes for the most frequent values at most; None: every value
    max_categories: int | None = None


@dataclass(frozen=True)
class FeatureSpec:
    label_delay_seconds: int
    aggregates: tuple[Aggregate, ...] = ()
    derives: tuple[Derive, ...] = ()
    columns: tuple[Column, ...] = ()
    # The model's features in order; None: every feature, in declaration order.
    outputs: tuple[str, ...] | None = None

    @property
    def defined(self) -> list[str]:
        """Every feature the spec defines, in declaration order."""
        names = [c.name for c in self.columns]
        names += [a.feature_name(w) for a in self.aggregates for w in a.windows]
        return names + [d.name for d in self.derives]

    @property
    def feature_names(self) -> list[str]:
        return list(self.outputs) if self.outputs is not None else self.defined

    @property
    def categorical(self) -> list[str]:
        """The model's categorical features, in ``feature_names`` order."""
        kinds = {c.name: c.kind for c in self.columns}
        return [name for name in self.feature_names if kinds.get(name) == "categorical"]

    @property
    def label_delay_days(self) -> int:
        """Whole days, rounded up, for the time splits."""
        return -(-self.label_delay_seconds // UNIT_SECONDS["d"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label_delay": _duration_text(self.label_delay_seconds)}
        if self.outputs is not None:
            out["features"] = list(self.outputs)
        out["aggregate"] = [_aggregate_dict(a) for a in self.aggregates]
        out["derive"] = [{"name": d.name, "expr": d.expr} for d in self.derives]
        out["column"] = [_column_dict(c) for c in self.columns]
        return out

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def derive_order(self) -> list[Derive]:
        """Derived features in an order where each comes after the ones it reads."""
        by_name = {d.name: d for d in self.derives}
        done: list[Derive] = []
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise ConfigError(f"derive {name!r}: cycle between derived features: {cycle}")
            state[name] = "visiting"
            for ref in sorted(referenced_names(by_name[name].tree) & by_name.keys()):
                visit(ref, [*path, name])
            state[name] = "done"
            done.append(by_name[name])

        for derive in self.derives:
            visit(derive.name, [])
        return done


def load_spec(path: Path) -> FeatureSpec:
    """Read and check a spec file; a bad one is a ``ConfigError`` naming the entry."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"feature spec {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"feature spec {path} is not valid TOML: {exc}") from None
    return parse_spec(raw)


def parse_spec(raw: dict[str, Any]) -> FeatureSpec:
    unknown = set(raw) - {"label_delay", "features", "aggregate", "derive", "column"}
    if unknown:
        raise ConfigError(f"feature spec: unknown key {sorted(unknown)[0]!r}")
    if "label_delay" not in raw:
        raise ConfigError('feature spec: label_delay is required (e.g. label_delay = "7d")')
    delay = _duration(raw["label_delay"], "label_delay")
    spec = FeatureSpec(
        label_delay_seconds=delay,
        aggregates=tuple(_aggregate(entry) for entry in _entries(raw, "aggregate")),
        derives=tuple(_derive(entry) for entry in _entries(raw, "derive")),
        columns=tuple(_column(entry) for entry in _entries(raw, "column")),
        outputs=None if "features" not in raw else tuple(_strings(raw["features"], "features")),
    )
    _check_names(spec)
    spec.derive_order()  # raises on a cycle
    return spec


def _entries(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    entries = raw.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"feature spec: {key} must be an array of tables ([[{key}]])")
    return entries


def _aggregate(entry: dict[str, Any]) -> Aggregate:
    name = _entry_name(entry, "aggregate")
    where = f"aggregate {name!r}"
    unknown = set(entry) - _AGGREGATE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    fn = entry.get("fn")
    if fn not in FUNCTIONS:
        raise ConfigError(f"{where}: unknown fn {fn!r} (expected one of {', '.join(FUNCTIONS)})")
    by = tuple(_strings(entry.get("by"), f"{where}: by"))
    if not by:
        raise ConfigError(f"{where}: by must name at least one key column")
    windows = tuple(
        _window(text, where) for text in _strings(entry.get("windows"), f"{where}: windows")
    )
    if not windows:
        raise ConfigError(f"{where}: windows must list at least one window")
    aggregate = Aggregate(
        name=name, by=by, fn=fn, windows=windows, of=entry.get("of"), where=entry.get("where"),
        delayed=bool(entry.get("delayed", fn in READS_LABELS)), default=entry.get("default"),
        unit=entry.get("unit", "s"), k=entry.get("k"),
        typical=_window(entry["typical"], where) if isinstance(entry.get("typical"), str) else None,
    )  # fmt: skip
    _check_aggregate(aggregate, entry, where)
    return aggregate


def _check_aggregate(a: Aggregate, entry: dict[str, Any], where: str) -> None:
    if a.fn in NEEDS_VALUE and not isinstance(a.of, str):
        raise ConfigError(f"{where}: fn {a.fn!r} needs `of`, the value column")
    if a.fn not in NEEDS_VALUE and a.of is not None:
        raise ConfigError(f"{where}: fn {a.fn!r} takes no `of`")
    if a.fn in READS_LABELS and not a.delayed:
        raise ConfigError(f"{where}: fn {a.fn!r} reads labels, so its windows must be delayed")
    if a.default is not None and (a.fn in ZERO_WHEN_EMPTY or isinstance(a.default, bool)):
        raise ConfigError(f"{where}: `default` is for fns whose empty window is null, as a number")
    if a.default is not None and not isinstance(a.default, int | float):
        raise ConfigError(f"{where}: `default` must be a number, however got {a.default!r}")
    if "unit" in entry and (a.fn not in TIME_FUNCTIONS or a.unit not in ("s", "m", "h", "d")):
        raise ConfigError(f"{where}: `unit` is s, m, h or d, for the time_since_* fns only")
    if a.delayed and a.fn in ("time_since_last", "time_since_first"):
        raise ConfigError(f"{where}: {a.fn} windows cannot be delayed")
    if a.fn == "time_since_fraud" and any(w.events for w in a.windows):
        raise ConfigError(f"{where}: time_since_fraud takes duration windows only")
    if a.delayed and a.fn == "count_distinct" and any(w.events for w in a.windows):
        raise ConfigError(f"{where}: delayed count_distinct takes duration windows only")
    _check_count_above(a, entry, where)
    if a.where is not None:
        if not isinstance(a.where, str):
            raise ConfigError(f"{where}: `where` must be an expression string")
        _parse(a.where, where)


def _check_count_above(a: Aggregate, entry: dict[str, Any], where: str) -> None:
    if a.fn != "count_above":
        if "k" in entry or "typical" in entry:
            raise ConfigError(f"{where}: `k` and `typical` are for fn count_above only")
        return
    k = entry.get("k")
    if isinstance(k, bool) or not isinstance(k, int | float) or not k >= 0:
        raise ConfigError(f"{where}: count_above needs `k`, a number >= 0, however got {k!r}")
    if not isinstance(entry.get("typical"), str) or a.typical is None or a.typical.events:
        raise ConfigError(
            f"{where}: count_above needs `typical`, the duration window of the typical value "
            f'(e.g. "30d"), however got {entry.get("typical")!r}'
        )
    if a.delayed or any(w.events for w in a.windows):
        raise ConfigError(f"{where}: count_above takes duration windows only, never delayed")


def _derive(entry: dict[str, Any]) -> Derive:
    name = _entry_name(entry, "derive")
    unknown = set(entry) - {"name", "expr"}
    if unknown:
        raise ConfigError(f"derive {name!r}: unknown key {sorted(unknown)[0]!r}")
    if not isinstance(entry.get("expr"), str):
        raise ConfigError(f"derive {name!r}: `expr` must be an expression string")
    _parse(entry["expr"], f"derive {name!r}")
    return Derive(name=name, expr=entry["expr"])


def _column(entry: dict[str, Any]) -> Column:
    name = _entry_name(entry, "column")
    kind = entry.get("kind", "numeric")
    if kind not in KINDS:
        raise ConfigError(
            f"column {name!r}: unknown kind {kind!r} (expected one of numeric, categorical)"
        )
    unknown = set(entry) - {"name", "kind", "max_categories"}
    if unknown:
        raise ConfigError(f"column {name!r}: unknown key {sorted(unknown)[0]!r}")
    cap = entry.get("max_categories")
    if cap is not None and kind != "categorical":
        raise ConfigError(f'column {name!r}: max_categories is for kind = "categorical" only')
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(
            f"column {name!r}: max_categories must be an integer >= 1, however got {cap!r}"
        )
    return Column(name=name, kind=kind, max_categories=cap)


def _parse(text: str, where: str) -> Expr:
    try:
        return parse_expression(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _entry_name(entry: dict[str, Any], kind: str) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{kind} {name!r}: name must be letters, digits and _ (not first digit)")
    return name


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, however got {value!r}")
    return value


def _window(text: str, where: str) -> Window:
    cleaned = text.strip().lower()
    if match := _LAST.match(cleaned):
        return Window(label=f"last{match.group(1)}", events=int(match.group(1)))
    if _DURATION.match(cleaned):
        return Window(label=cleaned, seconds=_duration(cleaned, where))
    raise ConfigError(
        f'{where}: bad window {text!r} (expected a duration such as 90s, 1h, 1d, 30d, or "last N")'
    )


def _duration(text: Any, where: str) -> int:
    match = _DURATION.match(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"{where}: bad duration {text!r} (expected e.g. 90s, 15m, 1h, 7d, 2w)")
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


def _duration_text(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        if seconds % UNIT_SECONDS[unit] == 0:
            return f"{seconds // UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


def _check_names(spec: FeatureSpec) -> None:
    seen: set[str] = set()
    for name in spec.defined:
        if name in seen:
            raise ConfigError(f"feature {name!r}: name clash (defined twice)")
        if name in CALENDAR:
            raise ConfigError(f"feature {name!r}: name clash with the calendar part {name!r}")
        seen.add(name)
    for name in spec.outputs or ():
        if name not in seen:
            raise ConfigError(f"features: {name!r} is not defined by any entry of the spec")
    if spec.outputs is not None and len(set(spec.outputs)) != len(spec.outputs):
        raise ConfigError("features: a name is listed twice")


def _column_dict(c: Column) -> dict[str, Any]:
    out: dict[str, Any] = {"name": c.name, "kind": c.kind}
    if c.max_categories is not None:
        out["max_categories"] = c.max_categories
    return out


def _aggregate_dict(a: Aggregate) -> dict[str, Any]:
    out: dict[str, Any] = {"name": a.name, "by": list(a.by), "fn": a.fn}
    if a.of is not None:
        out["of"] = a.of
    if a.where is not None:
        out["where"] = a.where
    out["windows"] = [w.label if w.seconds else f"last {w.events}" for w in a.windows]
    if a.delayed and a.fn not in READS_LABELS:
        out["delayed"] = True
    if a.default is not None:
        out["default"] = a.default
    if a.fn in TIME_FUNCTIONS and a.unit != "s":
        out["unit"] = a.unit
    if a.k is not None:
        out["k"] = float(a.k)
    if a.typical is not None:
        out["typical"] = a.typical.label
    return out


def spec_to_toml(spec: FeatureSpec) -> str:
    """The spec as a TOML file that ``load_spec`` reads back to the same spec."""
    data = spec.to_dict()
    lines = [f"label_delay = {_toml(data['label_delay'])}"]
    if "features" in data:
        lines.append("features = [")
        lines += [f"  {_toml(name)}," for name in data["features"]]
        lines.append("]")
    for section in ("column", "aggregate", "derive"):
        for entry in data[section]:
            lines += ["", f"[[{section}]]"]
            lines += [f"{key} = {_toml(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string is a JSON string for these characters
