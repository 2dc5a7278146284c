"""How much memory the Polars engine needs for a log, and how much this machine has.

The Polars engine holds the log, the feature table and its intermediates in memory at once.
Past what the machine has, the kernel would kill it midway (or Polars would abort); instead the
log is measured against the memory before the work and refused with a clear error that points
to the Spark engine. The estimate is linear in rows x output columns: ``PEAK_FACTOR`` 8-byte
values per output cell plus a fixed base, set from ``benchmarks/features_scale.py``, which
prints this estimate beside the peak it measures, so that a drift shows there.
"""

from __future__ import annotations

from pathlib import Path

from fraudflow.errors import ConfigError, DataError

__all__ = ["available_memory", "check_memory", "parse_size", "peak_memory"]

PEAK_FACTOR = 4.5  # peak bytes per output cell, in 8-byte values
BASE_BYTES = 512 * 2**20  # the interpreter, Polars and the libraries before any row
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def peak_memory(rows: int, columns: int) -> int:
    """Bytes the Polars engine is expected to need at its peak for ``rows`` x ``columns``."""
    return BASE_BYTES + int(rows * columns * 8 * PEAK_FACTOR)


def available_memory() -> int | None:
    """Bytes this process may still use: the least of the system's available memory and its
    cgroup's room (containers see the host's memory in /proc/meminfo); None if unknown."""
    found = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(found) if found else None


def check_memory(rows: int, columns: int, *, limit: int | None = None) -> None:
    """Refuse, before the work, a log whose features would not fit in ``limit`` bytes (by
    default the memory available now)."""
    have = available_memory() if limit is None else limit
    need = peak_memory(rows, columns)
    if have is None or need <= have:
        return
    raise DataError(
        f"building {columns} columns for {rows:,} transactions needs about {_gib(need)} of "
        f"memory with the Polars engine, however {_gib(have)} "
        f"{'is the limit' if limit is not None else 'is available'}: "
        "use --engine spark, or a machine with more memory"
    )


def parse_size(text: str) -> int:
    """``16GiB``, ``16G``, ``512MiB``, ``1000000`` (bytes) as bytes."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = raw, ""
    if raw and raw[-1] in _UNITS:
        number, unit = raw[:-1], raw[-1]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(
            f"a memory size must look like 16GiB or 512MiB, however got {text!r}"
        ) from None
    if value <= 0:
        raise ConfigError(f"a memory size must be > 0, however got {text!r}")
    return int(value * _UNITS[unit])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """cgroup v2 (memory.max, memory.current), else v1 (limit_in_bytes, usage_in_bytes)."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            cap = Path(limit).read_text().strip()
            used = int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if cap == "max" or int(cap) >= 2**60:  # no limit set
            return None
        return max(0, int(cap) - used)
    return None
