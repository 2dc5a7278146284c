"""The HTTP API's bodies; names say the direction (``...In`` requests, ``...Out`` responses).

A transaction is the canonical schema (``fraudflow.data.schema``); other fields are allowed,
and kept for a model whose feature spec reads them (the service checks those against the spec
served: a missing one is a 422 naming it). ``timestamp`` is an ISO 8601 string, UTC (``Z``)
or with an offset; one without an offset is read as UTC, as ``fraudflow.data.ingest`` reads
a log.

Every request is validated whole here, by pydantic-core in one pass over the raw body, before
the service stores anything: whatever passes can be stored, scored, audited and answered, so
nothing after the state update can fail on a request's content.

- ids: a non-blank string of printable characters (no control characters), at most 256 of
  them, or an integer within signed 64 bits (what orjson, SQLite and Redis hold exactly);
- ``amount``: a JSON number (not a string, not ``true``), finite, between 0 and ``max_amount``
  (``--max-amount``): larger sums would overflow the window aggregates to ``inf``;
- timestamps: in the years 1970 to 2099, and at most ``--max-clock-skew`` ahead of the server's
  clock (``RequestClock``, given as the validation context). The clock check is the one Python
  step, folded into the timestamp's parser, which runs anyway.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    Strict,
    StrictBool,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
)

from fraudflow.errors import ConfigError
from fraudflow.features.online import Event, epoch_us
from fraudflow.serve.settings import parse_splits, split_text

__all__ = [
    "DEFAULT_MAX_AMOUNT",
    "EARLIEST_TIMESTAMP",
    "LATEST_TIMESTAMP",
    "MAX_BATCH",
    "MAX_ID_LENGTH",
    "ChallengerOut",
    "DecisionBatchIn",
    "DecisionBatchOut",
    "DecisionOut",
    "ErrorOut",
    "HealthOut",
    "LabelIn",
    "LabelOut",
    "ReasonOut",
    "ReloadIn",
    "ReloadOut",
    "RequestClock",
    "TransactionIn",
    "ValidationErrorOut",
    "ValidationIssueOut",
    "batch_model",
    "transaction_model",
]

MAX_BATCH = 10_000
MAX_ID_LENGTH = 256
DEFAULT_MAX_AMOUNT = 1e9  # ServeSettings.max_amount's default
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)  # inclusive
LATEST_TIMESTAMP = datetime(2100, 1, 1, tzinfo=UTC)  # exclusive
# Signed 64 bits, as exclusive bounds: neither fits an int64 itself, so JSON Schema validators
# that read a bound within int64 as a double (jsonschema-rs) compare these exactly.
_INT64_EXCLUSIVE = (-(2**63) - 1, 2**63)
# C0 controls, DEL and C1 controls. The pattern is one Rust regex in pydantic-core, and also
# valid for Python's re and ECMA-262, which clients and schemathesis generate from.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
_PRINTABLE_NOT_BLANK = rf"^[^{_CONTROL}]*[^\s{_CONTROL}][^{_CONTROL}]*$"


TextId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=_PRINTABLE_NOT_BLANK),
]


def _whole(value: Any) -> int:
    """The integer a whole JSON number such as ``7.0`` is; anything else is not this kind of id.

    Reached only by what is neither a string id nor an integer one (left-to-right union), so
    the Python call costs nothing for the usual ids.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError("must be a whole number")


IntId = Annotated[int, Strict(), Field(gt=_INT64_EXCLUSIVE[0], lt=_INT64_EXCLUSIVE[1])]
# JSON has one kind of number: 7.0 is the integer 7 (JSON Schema reads it so too). Only a
# float is turned into an int here: a lax int would read `true` as 1.
WholeFloatId = Annotated[
    int, Field(gt=_INT64_EXCLUSIVE[0], lt=_INT64_EXCLUSIVE[1]), BeforeValidator(_whole)
]
_ID_RULE = (
    f"a string of 1 to {MAX_ID_LENGTH} printable characters, not all blank, or an integer "
    "within signed 64 bits"
)


class _OneError:
    """An id's problem as one error at the field, saying what an id is, rather than one error
    per kind of id (with the regex and the union's inner names in the messages)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        schema = dict(handler(source))  # the union's core schema
        schema["custom_error_type"] = "invalid_id"
        schema["custom_error_message"] = f"must be {_ID_RULE}"
        return schema


_ID_JSON_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
         "pattern": _PRINTABLE_NOT_BLANK},
        {"type": "integer", "exclusiveMinimum": _INT64_EXCLUSIVE[0],
         "exclusiveMaximum": _INT64_EXCLUSIVE[1]},
    ],
    "description": _ID_RULE,
    "examples": ["tx-1001", 1001],
}  # fmt: skip
# Left to right: a string id (the usual kind) is settled by the first choice alone.
Id = Annotated[
    TextId | IntId | WholeFloatId,
    Field(union_mode="left_to_right"),
    _OneError(),
    WithJsonSchema(_ID_JSON_SCHEMA),
]


class RequestClock(NamedTuple):
    """The server's clock as one request sees it: the validation context of its body."""

    now_s: float  # seconds since the epoch
    max_skew_seconds: float

    @classmethod
    def read(cls, max_skew_seconds: float) -> RequestClock:
        return cls(time.time(), max_skew_seconds)


_EARLIEST_S, _LATEST_S = EARLIEST_TIMESTAMP.timestamp(), LATEST_TIMESTAMP.timestamp()


def _timestamp(value: Any, info: ValidationInfo) -> datetime:
    """An ISO 8601 string in the sane range, and not ahead of the request's clock.

    Only strings: pydantic would otherwise read a number as seconds since the epoch. The
    checks compare seconds since the epoch: comparing datetimes with different offsets costs
    several times as much, and this runs for every transaction.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an ISO 8601 date-time string") from None
    if not isinstance(value, datetime):
        raise ValueError("must be an ISO 8601 date-time string")
    seconds = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
    if not _EARLIEST_S <= seconds < _LATEST_S:
        raise ValueError(f"must be in the years 1970 to 2099, however got {value.isoformat()}")
    clock = info.context
    if isinstance(clock, RequestClock) and seconds > clock.now_s + clock.max_skew_seconds:
        now = datetime.fromtimestamp(clock.now_s, UTC).isoformat(timespec="seconds")
        raise ValueError(
            f"must be at most {clock.max_skew_seconds:g} seconds ahead of the server's clock "
            f"({now}), however got {value.isoformat()}"
        )
    return value


Timestamp = Annotated[
    datetime,
    BeforeValidator(_timestamp),
    Field(
        description="ISO 8601; without an offset it is UTC. Years 1970 to 2099, and at most "
        "--max-clock-skew ahead of the server's clock."
    ),
]


def _amount(maximum: float) -> Any:
    return Annotated[float, Strict(), Field(ge=0, le=maximum, allow_inf_nan=False)]


class TransactionIn(BaseModel):
    # Other fields are kept (``model_extra``): a model trained on a feature spec that reads
    # columns beyond the canonical ones (``fraudflow.features.spec``) gets them from there;
    # the service checks them against the served spec (``OnlinePath.problem``).
    model_config = ConfigDict(extra="allow", frozen=True)

    transaction_id: Id
    timestamp: Timestamp
    customer_id: Id
    terminal_id: Id
    amount: _amount(DEFAULT_MAX_AMOUNT)  # type: ignore[valid-type]

    def event(self) -> Event:
        """The transaction as the online features read it (ids as strings, as in a log)."""
        return Event(
            str(self.transaction_id),
            epoch_us(self.timestamp),
            str(self.customer_id),
            str(self.terminal_id),
            self.amount,
        )


class DecisionBatchIn(BaseModel):
    transactions: list[TransactionIn] = Field(min_length=1, max_length=MAX_BATCH)


@cache
def transaction_model(max_amount: float) -> type[TransactionIn]:
    """``TransactionIn`` whose ``amount`` is at most ``max_amount`` (``--max-amount``).

    A model per limit, so that pydantic-core checks the limit in its one pass (and the OpenAPI
    document shows it), rather than a Python validator per transaction.
    """
    if max_amount == DEFAULT_MAX_AMOUNT:
        return TransactionIn
    model: type[TransactionIn] = create_model(
        "TransactionIn", __base__=TransactionIn, amount=(_amount(max_amount), ...)
    )
    return model


@cache
def batch_model(max_amount: float) -> type[DecisionBatchIn]:
    """``DecisionBatchIn`` of ``transaction_model(max_amount)``."""
    if max_amount == DEFAULT_MAX_AMOUNT:
        return DecisionBatchIn
    transactions: Any = list[transaction_model(max_amount)]  # type: ignore[misc]
    model: type[DecisionBatchIn] = create_model(
        "DecisionBatchIn",
        __base__=DecisionBatchIn,
        transactions=(transactions, Field(min_length=1, max_length=MAX_BATCH)),
    )
    return model


class ReasonOut(BaseModel):
    kind: Literal["threshold", "rule", "feature"]
    name: str
    detail: str
    value: float | None
    contribution: float | None


class DecisionOut(BaseModel):
    transaction_id: str | int
    score: float = Field(description="calibrated fraud probability")
    decision: Literal["approve", "review", "block"]
    reasons: list[ReasonOut]
    model_version: str


class DecisionBatchOut(BaseModel):
    decisions: list[DecisionOut] = Field(description="in request order")


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    transaction_id: Id
    is_fraud: StrictBool | Literal[0, 1]
    reported_at: Timestamp | None = None


class LabelOut(BaseModel):
    transaction_id: str | int
    is_fraud: bool
    applied: bool = Field(
        description="false when the feature state does not hold the transaction (unknown, or "
        "older than its retention); the label is stored for retraining either way"
    )


class ReloadIn(BaseModel):
    run: str | None = Field(None, description="run folder; default: the one being served")
    shadow: list[str] | None = Field(
        None,
        max_length=16,
        description="challenger run folders scored in shadow beside it; [] for none; "
        "default: the challengers served now, less the new champion",
    )
    split: dict[str, str] | None = Field(
        None,
        max_length=16,
        description='the share of cards a challenger decides, {"RUN": "5%"} as --split (its '
        "runs join the challengers); {} for none; default: the shares served now",
    )

    @field_validator("split")
    @classmethod
    def _split_shares(cls, split: dict[str, str] | None) -> dict[str, str] | None:
        if split is not None:
            try:
                parse_splits(split_text(split))
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return split


class ChallengerOut(BaseModel):
    run: str
    model_version: str
    split: float | None = Field(description="the share of cards it decides; null: none")


class ReloadOut(BaseModel):
    model_version: str
    previous_model_version: str | None
    run: str
    shadow: list[ChallengerOut] = Field(description="the challengers scored in shadow now")


class HealthOut(BaseModel):
    status: str
    model_version: str | None = None
    # /readyz while the state store or the audit log fails: part -> cause
    problems: dict[str, str] | None = None


class ErrorOut(BaseModel):
    detail: str = Field(description="a fixed string per cause")


class ValidationIssueOut(BaseModel):
    type: str = Field(description="pydantic's error type, e.g. less_than_equal")
    loc: list[str | int] = Field(description='where: ["body", field, ...]')
    msg: str


class ValidationErrorOut(BaseModel):
    detail: list[ValidationIssueOut] | str = Field(
        description="the problems of a body, each with its place; a fixed string where the "
        "body is well formed but the service refuses its content"
    )
