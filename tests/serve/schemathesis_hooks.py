"""schemathesis hooks for ``test_openapi`` (loaded through ``SCHEMATHESIS_HOOKS``).

Two things JSON Schema (or schemathesis) cannot get right on its own:

- A valid ``timestamp`` is more than the ``date-time`` format: the service refuses one before
  1970 or more than ``--max-clock-skew`` ahead of its clock. Valid timestamps are drawn from
  1970 up to now; invalid ones stay schemathesis' own.
- Integer ids go up to 2**63 - 1, beyond a double's exact range. schemathesis computes some
  near-boundary integers from the bound read as a double (2**63 - 1 becomes
  9223372036854776000, then "one less"), so it sends ids outside signed 64 bits as valid ones.
  Such a "valid data rejected" failure is dropped only when the request really holds an
  integer outside signed 64 bits; every other failure stands.
"""

from datetime import UTC, datetime
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import RejectedPositiveData

_SINCE = datetime(1970, 1, 1)
_UNTIL = datetime.now(UTC).replace(tzinfo=None)
_OFFSETS = st.sampled_from(["Z", "+00:00", "+05:30", "-08:00"])
_INT64 = range(-(2**63), 2**63)


def _timestamp(when: datetime, offset: str) -> str:
    return when.isoformat() + offset


schemathesis.openapi.format(
    "date-time", st.builds(_timestamp, st.datetimes(_SINCE, _UNTIL), _OFFSETS)
)


def _integers_beyond_int64(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_integers_beyond_int64(v) for v in value.values())
    if isinstance(value, list):
        return any(_integers_beyond_int64(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value not in _INT64


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a rejection of ids that are in fact outside signed 64 bits."""
    return not (isinstance(failure, RejectedPositiveData) and _integers_beyond_int64(case.body))
