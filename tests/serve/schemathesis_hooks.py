"""schemathesis hooks for ``test_openapi`` (loaded through ``SCHEMATHESIS_HOOKS``).

A valid ``timestamp`` is more than the ``date-time`` format says: the service refuses one
before 1970 or more than ``--max-clock-skew`` ahead of its clock, which JSON Schema cannot
express. Valid timestamps are therefore drawn from 1970 up to now; invalid ones stay
schemathesis' own. Nothing else is changed, and no failure is filtered.
"""

from datetime import UTC, datetime

import schemathesis
from hypothesis import strategies as st

_SINCE = datetime(1970, 1, 1)
_UNTIL = datetime.now(UTC).replace(tzinfo=None)
_OFFSETS = st.sampled_from(["Z", "+00:00", "+05:30", "-08:00"])


def _timestamp(when: datetime, offset: str) -> str:
    return when.isoformat() + offset


schemathesis.openapi.format(
    "date-time", st.builds(_timestamp, st.datetimes(_SINCE, _UNTIL), _OFFSETS)
)
