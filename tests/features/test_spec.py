"""Features as data: the spec, its expressions, and the batch engine on hand-computed tables."""

import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.config import FeatureConfig
from fraudflow.errors import ConfigError
from fraudflow.features import (
    build_features,
    default_spec,
    load_spec,
    parse_spec,
    read_feature_table,
    spec_to_toml,
)
from fraudflow.features.expressions import parse_expression, referenced_names
from fraudflow.features.spec_online import reference_engine
from tests.helpers.random_specs import SECONDS, WHERE, random_log, random_spec

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday, noon


def _log(rows: list[tuple[int, int, str, str, float, int]]) -> pl.DataFrame:
    """(transaction_id, minute, customer, category, amount, is_fraud) -> a canonical log."""
    return pl.DataFrame(
        {
            "transaction_id": [r[0] for r in rows],
            "timestamp": [T0 + timedelta(minutes=r[1]) for r in rows],
            "customer_id": [r[2] for r in rows],
            "terminal_id": ["T"] * len(rows),
            "amount": [r[4] for r in rows],
            "is_fraud": [r[5] for r in rows],
            "category": [r[3] for r in rows],
        }
    )


# Rows 2 and 3 share a timestamp (row 2 arrived first); row 5 arrives before row 4, earlier.
LOG = _log(
    [
        (1, 0, "A", "x", 10.0, 0),
        (2, 10, "A", "y", 20.0, 1),
        (3, 10, "A", "x", 30.0, 0),
        (5, 80, "B", "x", 5.0, 0),
        (4, 70, "A", "x", 40.0, 0),
        (6, 130, "A", "y", 50.0, 0),
    ]
)

SPEC = {
    "label_delay": "1h",
    "aggregate": [
        {"name": "cnt", "by": ["customer_id"], "fn": "count", "windows": ["1h", "last 2"]},
        {"name": "cat_mean", "by": ["customer_id", "category"], "fn": "mean", "of": "amount",
         "windows": ["1h"]},
        {"name": "hi", "by": ["customer_id"], "fn": "max", "of": "amount", "windows": ["1h"]},
        {"name": "lo", "by": ["customer_id"], "fn": "min", "of": "amount", "windows": ["1h"]},
        {"name": "sd", "by": ["customer_id"], "fn": "std", "of": "amount", "windows": ["1h"]},
        {"name": "total", "by": ["customer_id"], "fn": "sum", "of": "amount", "windows": ["1h"]},
        {"name": "cats", "by": ["customer_id"], "fn": "count_distinct", "of": "category",
         "windows": ["1h", "last 2"]},
        {"name": "since", "by": ["customer_id"], "fn": "time_since_last", "unit": "m",
         "windows": ["1h"]},
        {"name": "frauds", "by": ["customer_id"], "fn": "fraud_count", "windows": ["1h"]},
        {"name": "rate", "by": ["customer_id"], "fn": "fraud_rate", "windows": ["2h"],
         "default": -1.0},
        {"name": "small", "by": ["customer_id"], "fn": "count", "where": "amount < 25",
         "windows": ["1h"]},
    ],
    "derive": [
        {"name": "ratio", "expr": "amount / cat_mean__1h"},
        {"name": "busy", "expr": "where(cnt__1h >= 3, 1, 0)"},
        {"name": "ratio_doubled", "expr": "2 * ratio"},
        {"name": "weekend_or_night", "expr": "is_weekend or is_night"},
        {"name": "first_in_hour", "expr": "coalesce(since__1h, -1) < 0"},
    ],
}  # fmt: skip

NAN = math.nan
# Worked by hand from LOG (see the docstring of fraudflow.features.spec for the rules), in
# time order: transaction ids 1, 2, 3, 4, 5, 6.
EXPECTED = {
    "transaction_id": [1, 2, 3, 4, 5, 6],
    "cnt__1h": [1, 2, 3, 1, 1, 1],  # row 4's hour (t=10, 70] excludes the t=10 rows
    "cnt__last2": [1, 2, 2, 2, 1, 2],
    "cat_mean__1h": [10, 20, 20, 40, 5, 50],
    "hi__1h": [10, 20, 30, 40, 5, 50],
    "lo__1h": [10, 10, 10, 40, 5, 50],
    "sd__1h": [0, 5, math.sqrt(200 / 3), 0, 0, 0],
    "total__1h": [10, 30, 60, 40, 5, 50],
    "cats__1h": [1, 2, 2, 1, 1, 1],
    "cats__last2": [1, 2, 2, 1, 1, 2],
    "since__1h": [NAN, 10, 0, NAN, NAN, NAN],  # rows 4 and 6: the previous row is 60 min back
    "frauds__1h": [0, 0, 0, 1, 0, 0],  # (t-2h, t-1h]: row 4 sees row 2's label, row 6 does not
    "rate__2h": [-1, -1, -1, 1 / 3, -1, 1 / 4],  # (t-3h, t-1h]
    "small__1h": [1, 2, 2, 0, 1, 0],
    "ratio": [1, 1, 1.5, 1, 1, 1],
    "busy": [0, 0, 1, 0, 0, 0],
    "ratio_doubled": [2, 2, 3, 2, 2, 2],
    "weekend_or_night": [0, 0, 0, 0, 0, 0],
    "first_in_hour": [1, 0, 0, 1, 1, 1],
}


def _assert_columns(frame: pl.DataFrame, expected: dict[str, list[float]]) -> None:
    for name, values in expected.items():
        got = frame[name].to_list()
        for row, (a, b) in enumerate(zip(got, values, strict=True)):
            if isinstance(b, float) and math.isnan(b):
                assert a is None, f"{name} row {row}: expected null, got {a}"
            else:
                assert a == pytest.approx(b, rel=1e-12), f"{name} row {row}: {a} != {b}"


def test_hand_computed_table() -> None:
    out = build_features(LOG, parse_spec(SPEC))
    _assert_columns(out, EXPECTED)
    assert out.columns[:7] == LOG.columns  # the log's columns first, untouched


def test_a_later_row_or_an_unknown_label_changes_no_earlier_feature() -> None:
    spec = parse_spec(SPEC)
    before = build_features(LOG, spec)
    # Row 4 (t=70): its label is known at t=130; its amount from t=70 on.
    row4 = pl.col("transaction_id") == 4
    flipped = LOG.with_columns(
        pl.when(row4).then(1).otherwise(pl.col("is_fraud")).alias("is_fraud"),
        pl.when(row4).then(999.0).otherwise(pl.col("amount")).alias("amount"),
    )
    after = build_features(flipped, spec)
    features = [c for c in before.columns if c not in LOG.columns]
    earlier = pl.col("transaction_id") <= 3
    assert before.filter(earlier).select(features).equals(after.filter(earlier).select(features))
    row6 = after.filter(pl.col("transaction_id") == 6)
    assert row6["rate__2h"].item() == pytest.approx(2 / 4)  # the label arrived by t=130


def test_the_default_spec_round_trips_through_toml(tmp_path: Path) -> None:
    spec = default_spec(FeatureConfig(label_delay_days=5, small_amount=3.0))
    path = tmp_path / "spec.toml"
    path.write_text(spec_to_toml(spec))
    again = load_spec(path)
    assert again == spec and again.hash == spec.hash
    assert len(spec.feature_names) == 25
    assert "customer__hours_since_last__30d" not in spec.feature_names  # an input of a derive only


def test_features_spec_command_writes_the_default(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["features", "spec", "--out", str(tmp_path / "s.toml")])
    assert result.exit_code == 0, result.output
    assert load_spec(tmp_path / "s.toml").hash == default_spec(FeatureConfig()).hash


def test_features_spec_command_writes_the_v2_block_on_request(tmp_path: Path) -> None:
    args = ["features", "spec", "--out", str(tmp_path / "s.toml"), "--v2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_spec(tmp_path / "s.toml").hash == default_spec(FeatureConfig(), v2=True).hash


def test_features_command_with_a_spec_over_an_extra_column(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    LOG.write_parquet(log)
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(spec_to_toml(parse_spec(SPEC)))
    out = tmp_path / "features.parquet"
    args = ["features", "--input", str(log), "--out", str(out), "--spec", str(spec_file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = read_feature_table(out)
    assert table.feature_names == parse_spec(SPEC).feature_names
    assert table.meta["feature_spec_hash"] == parse_spec(SPEC).hash
    assert table.label_delay_days == 1  # 1h, rounded up to whole days for the splits
    _assert_columns(table.frame, {"cats__1h": EXPECTED["cats__1h"]})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "cnt", "windows": ["1h"]}]},
         "aggregate 'a': unknown fn 'cnt' (expected one of count, sum,"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "count", "windows": ["3q"]}]},
         "aggregate 'a': bad window '3q'"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "sum", "windows": ["1h"]}]},
         "aggregate 'a': fn 'sum' needs `of`, the value column"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "fraud_count",
                         "delayed": False, "windows": ["1h"]}]},
         "aggregate 'a': fn 'fraud_count' reads labels, so its windows must be delayed"),
        ({"derive": [{"name": "a", "expr": "b + 1"}, {"name": "b", "expr": "a * 2"}]},
         "derive 'a': cycle between derived features: a -> b -> a"),
        ({"derive": [{"name": "a", "expr": "1"}, {"name": "a", "expr": "2"}]},
         "feature 'a': name clash (defined twice)"),
        ({"derive": [{"name": "a", "expr": "sqrt(amount)"}]},
         "derive 'a': 'sqrt(amount)': unknown function 'sqrt'"),
        ({"derive": [{"name": "a", "expr": "amount.__class__"}]},
         "derive 'a': 'amount.__class__': Attribute is not allowed"),
        ({"column": [{"name": "category", "kind": "text"}]},
         "column 'category': unknown kind 'text' (expected one of numeric, categorical)"),
        ({"column": [{"name": "amount", "max_categories": 5}]},
         "column 'amount': max_categories is for kind = \"categorical\" only"),
        ({"column": [{"name": "category", "kind": "categorical", "max_categories": 0}]},
         "column 'category': max_categories must be an integer >= 1, however got 0"),
        ({"features": ["nope"]}, "features: 'nope' is not defined by any entry of the spec"),
        ({"label_delay": "soon"}, "label_delay: bad duration 'soon'"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "count_above", "of": "amount",
                         "typical": "30d", "windows": ["1d"]}]},
         "aggregate 'a': count_above needs `k`, a number >= 0, however got None"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "count_above", "of": "amount",
                         "k": 3, "typical": "last 5", "windows": ["1d"]}]},
         "aggregate 'a': count_above needs `typical`, the duration window of the typical value"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "count_above", "of": "amount",
                         "k": 3, "typical": "7d", "windows": ["last 3"]}]},
         "aggregate 'a': count_above takes duration windows only, never delayed"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "mean", "of": "amount",
                         "k": 3, "windows": ["1d"]}]},
         "aggregate 'a': `k` and `typical` are for fn count_above only"),
    ],
)  # fmt: skip
def test_a_bad_spec_names_the_entry_and_the_problem(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_spec({"label_delay": "7d", **change})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"aggregate": [{"name": "a", "by": ["merchant"], "fn": "count", "windows": ["1h"]}]},
         "aggregate 'a': column 'merchant' is not in the input (columns: transaction_id,"),
        ({"derive": [{"name": "a", "expr": "amount * fx_rate"}]},
         "derive 'a': unknown name 'fx_rate' (not a feature of the spec, a column of the input"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "count",
                         "where": "is_fraud == 1", "windows": ["1d"]}]},
         "aggregate 'a': reads `is_fraud`, which is known only after the label delay"),
        ({"derive": [{"name": "amount", "expr": "1"}]},
         "feature 'amount': name clash with a column of the input"),
        ({"column": [{"name": "merchant", "kind": "categorical"}]},
         "column 'merchant': column 'merchant' is not in the input (columns: transaction_id,"),
        ({"column": [{"name": "amount", "kind": "categorical"}]},
         "column 'amount': a categorical column holds strings, integers or booleans, however "
         "found Float64"),
    ],
)  # fmt: skip
def test_a_spec_that_does_not_fit_the_input_is_refused(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_features(LOG, parse_spec({"label_delay": "7d", **entry}))
    assert message in str(caught.value)


def test_a_bad_spec_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    LOG.write_parquet(log)
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('label_delay = "7d"\n[[aggregate]]\nname = "a"\nby = ["merchant"]\n'
                         'fn = "count"\nwindows = ["1h"]\n')  # fmt: skip
    out = tmp_path / "features.parquet"
    args = ["features", "--input", str(log), "--out", str(out), "--spec", str(spec_file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "error: aggregate 'a': column 'merchant' is not in the input" in said
    assert sorted(tmp_path.iterdir()) == sorted([log, spec_file])  # nothing written


def test_expressions_parse_into_a_tree_of_allowed_nodes() -> None:
    tree = parse_expression("where(amount > 2 * m__1d, clip(amount / m__1d, 0, 10), -1)")
    assert referenced_names(tree) == {"amount", "m__1d"}
    with pytest.raises(ConfigError, match="strings can only be compared with == or !="):
        parse_expression('channel < "ecom"')
    with pytest.raises(ConfigError, match="one comparison"):
        parse_expression("1 < amount < 5")


def test_division_by_zero_is_null_and_where_takes_the_else_branch_on_null() -> None:
    spec = parse_spec(
        {
            "label_delay": "1d",
            "derive": [
                {"name": "inv", "expr": "1 / (amount - 10)"},
                {"name": "pick", "expr": "where(inv > 0, 1, 2)"},
                {"name": "bigger", "expr": "max(inv, 0.5)"},
            ],
        }
    )
    out = build_features(LOG, spec)
    assert out["inv"].to_list()[0] is None  # amount 10
    assert out["pick"].to_list()[0] == 2.0
    assert out["bigger"].to_list()[0] == 0.5  # max ignores a null side


# ---------------------------------------------------------------- random specs against an oracle


def _in_window(rows: list[dict], i: int, window: str, delay: int | None) -> list[dict]:
    """Rows of the key of rows[i] (rows in time-then-arrival order) in its window."""
    t = rows[i]["t"]
    if window.startswith("last"):
        n = int(window.split()[1])
        seen = rows[: i + 1] if delay is None else [r for r in rows if r["t"] <= t - delay]
        return seen[-n:]
    w = SECONDS[window]
    if delay is None:
        return [r for r in rows[: i + 1] if r["t"] > t - w]
    return [r for r in rows if t - delay - w < r["t"] <= t - delay]


def _oracle(entry: dict, window: str, rows: list[dict], i: int, delay_s: int) -> float | None:
    fn, default = entry["fn"], entry.get("default")
    delay = delay_s if entry.get("delayed") else None
    passes = WHERE[entry.get("where")]
    inside = [r for r in _in_window(rows, i, window, delay) if passes(r)]
    if "of" in entry:
        inside = [r for r in inside if r[entry["of"]] is not None]
    values = [r[entry["of"]] for r in inside] if "of" in entry else []
    if fn == "count":
        return float(len(inside))
    if fn == "sum":
        return float(sum(values))
    if fn == "count_distinct":
        return float(len(set(values)))
    if fn == "fraud_count":
        return float(sum(r["is_fraud"] for r in inside))
    if fn == "count_above":
        return float(sum(_above(entry, rows, r) for r in inside))
    unit = {"s": 1, "h": 3_600}[entry.get("unit", "s")]
    if fn == "time_since_last":
        before = [r for r in inside if r["pos"] < rows[i]["pos"]]
        return (rows[i]["t"] - before[-1]["t"]) / unit if before else default
    if fn == "time_since_first":
        return (rows[i]["t"] - inside[0]["t"]) / unit if inside else default
    if fn == "time_since_fraud":
        frauds = [r for r in inside if r["is_fraud"]]
        return (rows[i]["t"] - frauds[-1]["t"]) / unit if frauds else default
    if not inside:
        return default
    if fn == "fraud_rate":
        return sum(r["is_fraud"] for r in inside) / len(inside)
    if fn == "mean":
        return sum(values) / len(values)
    if fn == "min":
        return min(values)
    if fn == "max":
        return max(values)
    mean = sum(values) / len(values)  # std, population
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _above(entry: dict, rows: list[dict], row: dict) -> bool:
    """The row's value against k times the mean over the key's matching rows before it in
    the typical window."""
    passes, of = WHERE[entry.get("where")], entry["of"]
    start = row["t"] - SECONDS[entry["typical"]]
    before = [
        r[of]
        for r in rows
        if r["pos"] < row["pos"] and r["t"] > start and passes(r) and r[of] is not None
    ]
    return bool(before) and row[of] > entry["k"] * (sum(before) / len(before))


@pytest.mark.parametrize("seed", range(25))
def test_random_specs_match_a_brute_force_oracle(seed: int) -> None:
    rng = random.Random(seed)
    log, raw = random_log(rng, 70), random_spec(rng)
    spec = parse_spec(raw)
    out = build_features(log, spec)
    rows = [
        {**row, "t": row["timestamp"].timestamp(), "pos": pos}
        for pos, row in enumerate(out.to_dicts())  # time order, arrival order within ties
    ]
    for entry in raw["aggregate"]:
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(tuple(row[c] for c in entry["by"]), []).append(row)
        for members in groups.values():
            for i, row in enumerate(members):
                for window in entry["windows"]:
                    name = f"{entry['name']}__{window.replace(' ', '')}"
                    want = _oracle(entry, window, members, i, spec.label_delay_seconds)
                    got = row[name]
                    where = f"seed {seed}, {entry}, {name}, transaction {row['transaction_id']}"
                    if want is None:
                        assert got is None, where
                    else:
                        # std from sums of squares: rounding of about sqrt(eps) of the scale.
                        tolerance = 1e-6 if entry["fn"] == "std" else 1e-9
                        assert got == pytest.approx(want, rel=1e-9, abs=tolerance), where


def test_the_v2_block_adds_ten_features_computed_point_in_time() -> None:
    spec = default_spec(FeatureConfig(), v2=True)
    added = spec.feature_names[25:]
    assert spec.feature_names[:25] == default_spec(FeatureConfig()).feature_names
    assert added == [
        "customer__amount_zscore__30d", "customer__amount_ratio__last10",
        "customer__terminals__1d", "customer__terminals__7d", "terminal__cards__1d",
        "terminal__known_fraud_count__1d", "customer__days_since_first__30d",
        "terminal__days_since_fraud__30d", "customer__count_above_typical__1d",
        "customer__count_above_typical__7d",
    ]  # fmt: skip
    out = build_features(LOG, spec)
    # Card A's amounts 10, 20, 30, 40, 50: none is 3 times the mean before it.
    assert out["customer__count_above_typical__7d"].to_list() == [0.0] * 6
    # Card A first seen at minute 0; card B's first row is its own (age 0). No label is known
    # within the 7-day delay: the terminal's days since fraud is the 37-day far end.
    age = dict(zip(out["transaction_id"], out["customer__days_since_first__30d"], strict=True))
    assert age[3] == pytest.approx(10 / 1_440) and age[6] == pytest.approx(130 / 1_440)
    assert age[5] == 0.0
    assert out["terminal__days_since_fraud__30d"].to_list() == [37.0] * 6
    # Card A: amounts 10, 20, 30 at t=0, 10, 10 (minutes): row 3's 30-day mean 20, std
    # sqrt(200/3); its z-score (30 - 20) / 8.165 = 1.2247.
    row3 = out.filter(pl.col("transaction_id") == 3)
    assert row3["customer__amount_zscore__30d"].item() == pytest.approx(10 / math.sqrt(200 / 3))
    assert row3["customer__amount_ratio__last10"].item() == pytest.approx(1.5)


def test_count_above_by_hand_in_batch_and_online() -> None:
    spec = parse_spec(
        {
            "label_delay": "1h",
            "aggregate": [
                {"name": "big", "by": ["customer_id"], "fn": "count_above", "of": "amount",
                 "k": 1.5, "typical": "1h", "windows": ["1h", "2h"]},
                {"name": "tie", "by": ["customer_id"], "fn": "count_above", "of": "amount",
                 "k": 1, "typical": "2h", "where": "amount >= 20", "windows": ["2h"]},
            ],
        }
    )  # fmt: skip
    # Card A (minute, amount): 1 (0, 10), 2 (10, 20), 3 (10, 30), 4 (70, 40), 6 (130, 50).
    # k 1.5 over the hour before: row 2: 20 > 1.5 * 10; row 3: 30 > 1.5 * 15 (rows 1 and 2);
    # row 4: nothing in (10, 70] before it; row 6: nothing in (70, 130] (row 4 is at 70).
    # Amounts >= 20, k 1 over two hours: row 3: 30 > 20; row 4: 40 > 25; row 6: 50 > 40.
    want = {
        1: (0.0, 0.0, 0.0), 2: (1.0, 1.0, 0.0), 3: (2.0, 2.0, 1.0), 5: (0.0, 0.0, 0.0),
        4: (0.0, 2.0, 2.0), 6: (0.0, 0.0, 2.0),
    }  # fmt: skip
    names = ["big__1h", "big__2h", "tie__2h"]
    out = build_features(LOG, spec)
    assert {row["transaction_id"]: tuple(row[n] for n in names) for row in out.to_dicts()} == want
    online = reference_engine(spec)
    for row in LOG.to_dicts():  # row 5 arrives before row 4, of another card
        got = online.features(row)
        assert tuple(got[n] for n in names) == want[row["transaction_id"]]


def test_time_since_first_and_time_since_fraud_by_hand() -> None:
    spec = parse_spec(
        {
            "label_delay": "1h",
            "aggregate": [
                {"name": "first", "by": ["customer_id"], "fn": "time_since_first",
                 "unit": "m", "windows": ["1h"]},
                {"name": "fraud", "by": ["terminal_id"], "fn": "time_since_fraud",
                 "unit": "m", "windows": ["2h"]},
            ],
        }
    )  # fmt: skip
    out = build_features(LOG, spec)
    got = {row["transaction_id"]: (row["first__1h"], row["fraud__2h"]) for row in out.to_dicts()}
    # Card A: rows at minutes 0, 10, 10, 70, 130; within 1h of minute 70 only row 4 itself.
    # Terminal T: the one fraud (row 2, minute 10) is known from minute 70 on.
    assert got == {
        1: (0.0, None), 2: (10.0, None), 3: (10.0, None), 4: (0.0, 60.0), 5: (0.0, 70.0),
        6: (0.0, 120.0),
    }  # fmt: skip
