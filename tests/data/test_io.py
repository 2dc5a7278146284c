"""Tables written atomically, whole or streamed from parts."""

from pathlib import Path

import polars as pl
import pytest

from fraudflow.data.io import read_parquet_metadata, write_table, write_table_parts
from fraudflow.errors import ConfigError

_SCHEMA = {"id": pl.String, "x": pl.Float64}


def _parts(tmp_path: Path) -> tuple[pl.DataFrame, list[Path]]:
    frame = pl.DataFrame({"id": [f"t{i}" for i in range(10)], "x": [i / 3 for i in range(10)]})
    paths = []
    for k, (lo, hi) in enumerate([(0, 4), (4, 4), (4, 10)]):  # the middle part is empty
        paths.append(tmp_path / f"part-{k}.parquet")
        frame.slice(lo, hi - lo).write_parquet(paths[-1])
    return frame, paths


def test_parts_make_the_table_write_table_makes(tmp_path: Path) -> None:
    frame, parts = _parts(tmp_path)
    meta = {"features": ["x"], "n": 3}
    rows = write_table_parts(parts, tmp_path / "out.parquet", schema=_SCHEMA, metadata=meta)
    write_table(frame, tmp_path / "whole.parquet", metadata=meta)
    assert rows == 10
    assert pl.read_parquet(tmp_path / "out.parquet").equals(frame)
    assert read_parquet_metadata(tmp_path / "out.parquet") == meta
    assert read_parquet_metadata(tmp_path / "whole.parquet") == meta


def test_parts_as_csv_have_one_header(tmp_path: Path) -> None:
    frame, parts = _parts(tmp_path)
    assert write_table_parts(parts, tmp_path / "out.csv", schema=_SCHEMA) == 10
    assert (tmp_path / "out.csv").read_text().count("id,x") == 1
    assert pl.read_csv(tmp_path / "out.csv").equals(frame)


def test_no_rows_is_the_empty_table_with_its_columns(tmp_path: Path) -> None:
    assert write_table_parts([], tmp_path / "out.parquet", schema=_SCHEMA, metadata={"a": 1}) == 0
    assert pl.read_parquet(tmp_path / "out.parquet").schema == pl.Schema(_SCHEMA)
    assert read_parquet_metadata(tmp_path / "out.parquet") == {"a": 1}


def test_a_bad_part_leaves_nothing(tmp_path: Path) -> None:
    _, parts = _parts(tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception):  # noqa: B017 - whatever Polars raises for a broken file
        write_table_parts(
            [*parts, tmp_path / "bad.parquet"], tmp_path / "out.parquet", schema=_SCHEMA
        )
    assert not (tmp_path / "out.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["bad.parquet", "part-0.parquet", "part-1.parquet", "part-2.parquet"]
    )
    with pytest.raises(ConfigError, match=r"must end in \.parquet or \.csv"):
        write_table_parts(parts, tmp_path / "out.txt", schema=_SCHEMA)
