"""The Polars engine's memory estimate and the sizes users write."""

import pytest

from fraudflow.errors import ConfigError, DataError
from fraudflow.features.memory import BASE_BYTES, PEAK_FACTOR, check_memory, parse_size, peak_memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GiB", 16 * 2**30), ("16G", 16 * 2**30), ("512MiB", 512 * 2**20), ("1.5k", 1536),
     ("1000000", 1_000_000), (" 2 TiB ", 2 * 2**40), ("64b", 64)],
)  # fmt: skip
def test_sizes_parse_in_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "16 parsecs"])
def test_a_bad_size_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="a memory size must"):
        parse_size(text)


def test_the_estimate_is_linear_in_cells() -> None:
    assert peak_memory(0, 30) == BASE_BYTES
    assert peak_memory(1_000_000, 30) - BASE_BYTES == int(1_000_000 * 30 * 8 * PEAK_FACTOR)
    assert peak_memory(2_000_000, 30) - BASE_BYTES == 2 * (peak_memory(1_000_000, 30) - BASE_BYTES)


def test_a_log_is_refused_exactly_past_the_limit() -> None:
    need = peak_memory(10_000_000, 33)
    check_memory(10_000_000, 33, limit=need)  # fits exactly
    with pytest.raises(DataError, match=r"building 33 columns for 10,000,000 transactions needs"):
        check_memory(10_000_000, 33, limit=need - 1)
