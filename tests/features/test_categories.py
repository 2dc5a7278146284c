"""Categorical columns: the spec accepts them, the batch engine passes the row's value through,
and their integer codes follow the documented order on tables whose answer is known."""

import json
import math
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from fraudflow.cli.main import app
from fraudflow.features import build_features, parse_spec
from fraudflow.features.categories import (
    UNSEEN,
    CategoryCodes,
    matrix_from_frame,
    matrix_from_rows,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
# Row 3 arrives before row 2, ten minutes earlier: the engine outputs time order.
LOG = pl.DataFrame(
    {
        "transaction_id": [1, 3, 2],
        "timestamp": [T0, T0 + timedelta(minutes=20), T0 + timedelta(minutes=10)],
        "customer_id": ["A", "A", "B"],
        "terminal_id": ["T", "T", "T"],
        "amount": [10.0, 20.0, 30.0],
        "is_fraud": [0, 1, 0],
        "category": ["x", "y", "x"],
        "mcc": [5411, 4111, 5411],
    }
)

# "food" 3 times, "fuel" and "toys" twice each (a tie: ascending value), "cars" once.
TRAIN = pl.DataFrame(
    {
        "category": ["toys", "food", "fuel", "food", "cars", "toys", "food", "fuel", None],
        "mcc": [5411, 5411, 5812, 5812, 5812, 4111, 5411, 5411, 4111],
    }
)


def test_codes_go_by_frequency_then_value_with_zero_for_unseen_and_null() -> None:
    codes = CategoryCodes.fit(TRAIN, {"category": None, "mcc": None})
    assert codes.values == {
        "category": ("food", "fuel", "toys", "cars"),
        "mcc": (5411, 5812, 4111),
    }
    assert codes.cardinality("category") == 5  # four values + the unseen code
    got = codes.encode("category", ["food", "cars", "boats", None, "toys"])
    assert got.tolist() == [1, 4, UNSEEN, UNSEEN, 3]
    assert codes.encode("mcc", [4111, 5411.0, 9999, None]).tolist() == [3, 1, UNSEEN, UNSEEN]


def test_codes_do_not_depend_on_row_order() -> None:
    shuffled = TRAIN.sample(fraction=1.0, shuffle=True, seed=3)
    assert CategoryCodes.fit(shuffled, {"category": None}) == CategoryCodes.fit(
        TRAIN, {"category": None}
    )


def test_a_cap_keeps_the_most_frequent_values_and_the_rest_share_the_unseen_code() -> None:
    codes = CategoryCodes.fit(TRAIN, {"category": 2})
    assert codes.values["category"] == ("food", "fuel")
    assert codes.encode("category", ["food", "fuel", "toys", "cars"]).tolist() == [1, 2, 0, 0]


def test_codes_survive_json() -> None:
    codes = CategoryCodes.fit(TRAIN, {"category": None, "mcc": 2})
    again = CategoryCodes.from_dict(json.loads(json.dumps(codes.to_dict())))
    assert again == codes
    assert again.encode("mcc", [5812]).tolist() == [2]


def test_the_frame_and_the_raw_rows_give_the_same_model_matrix() -> None:
    frame = pl.DataFrame(
        {
            "amount": [1.5, None, 3.0],
            "category": pl.Series(["fuel", "boats", None], dtype=pl.Categorical),
            "mcc": [4111, 5411, 1],
        }
    )
    codes = CategoryCodes.fit(TRAIN, {"category": None, "mcc": None})
    features = ["category", "amount", "mcc"]
    from_frame = matrix_from_frame(frame, features, codes)
    assert from_frame.dtype == np.float32
    np.testing.assert_array_equal(
        from_frame, np.array([[2, 1.5, 3], [0, math.nan, 1], [0, 3.0, 0]], dtype=np.float32)
    )
    rows = [["fuel", 1.5, 4111], ["boats", None, 5411], [None, 3.0, 1]]
    np.testing.assert_array_equal(matrix_from_rows(rows, features, codes), from_frame)


def test_the_batch_engine_outputs_the_rows_own_category() -> None:
    spec = parse_spec(
        {
            "label_delay": "1h",
            "column": [{"name": "category", "kind": "categorical", "max_categories": 10}],
            "aggregate": [
                {"name": "n", "by": ["customer_id", "category"], "fn": "count", "windows": ["1h"]}
            ],
        }
    )
    assert spec.categorical == ["category"]
    out = build_features(LOG, spec)
    assert out["category"].to_list() == ["x", "x", "y"]  # time order
    assert out["category"].dtype == pl.String
    assert spec.to_dict()["column"] == [
        {"name": "category", "kind": "categorical", "max_categories": 10}
    ]


def test_an_integer_category_stays_an_integer() -> None:
    spec = parse_spec({"label_delay": "1h", "column": [{"name": "mcc", "kind": "categorical"}]})
    out = build_features(LOG, spec)
    assert out["mcc"].dtype == pl.Int64 and out["mcc"].to_list() == [5411, 5411, 4111]


@pytest.mark.parametrize("listed", [True, False])
def test_only_the_models_features_count_as_categorical(listed: bool) -> None:
    raw = {
        "label_delay": "1h",
        "column": [{"name": "category", "kind": "categorical"}, {"name": "amount"}],
        "features": ["category", "amount"] if listed else ["amount"],
    }
    assert parse_spec(raw).categorical == (["category"] if listed else [])


def test_the_readme_example_over_a_merchant_category_builds() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    after = readme.split("An example over a merchant category", 1)[1]
    block = after.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(tomllib.loads('label_delay = "7d"\n' + block))
    log = LOG.rename({"category": "merchant_category"})
    out = build_features(log, spec)
    assert spec.categorical == ["merchant_category"]
    assert out["card__categories__7d"].to_list() == [1, 1, 2]  # card A: x, then x and y
    assert out["merchant_category"].to_list() == ["x", "x", "y"]


def test_a_float_column_declared_categorical_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    LOG.write_parquet(tmp_path / "log.parquet")
    (tmp_path / "spec.toml").write_text(
        'label_delay = "7d"\n[[column]]\nname = "amount"\nkind = "categorical"\n'
    )
    args = ["features", "--input", str(tmp_path / "log.parquet"), "--out"]
    args += [str(tmp_path / "out.parquet"), "--spec", str(tmp_path / "spec.toml")]
    result = CliRunner().invoke(app, [*args, "--engine", "spark"])  # refused before Spark starts
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "error: column 'amount': a categorical column holds strings, integers or" in said
    assert not (tmp_path / "out.parquet").exists()
