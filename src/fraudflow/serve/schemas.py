"""The HTTP API's bodies; names say the direction (``...In`` requests, ``...Out`` responses).

A transaction is the canonical schema (``fraudflow.data.schema``); other fields are allowed and
ignored. ``timestamp`` is an ISO 8601 string, UTC (``Z``) or with an offset; one without an
offset is read as UTC, as ``fraudflow.data.ingest`` reads a log.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

from fraudflow.features.online import Event, epoch_us

__all__ = [
    "MAX_BATCH",
    "DecisionBatchIn",
    "DecisionBatchOut",
    "DecisionOut",
    "HealthOut",
    "LabelIn",
    "LabelOut",
    "ReasonOut",
    "ReloadIn",
    "ReloadOut",
    "TransactionIn",
]

MAX_BATCH = 10_000


def _iso_8601(value: Any) -> Any:
    """Only strings: pydantic would otherwise read a number as seconds since the epoch."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date-time string") from None


Id = Annotated[str, Field(min_length=1, max_length=256)] | StrictInt
Timestamp = Annotated[datetime, BeforeValidator(_iso_8601)]


class TransactionIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    transaction_id: Id
    timestamp: Timestamp
    customer_id: Id
    terminal_id: Id
    amount: float = Field(ge=0, allow_inf_nan=False)

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


class ReloadOut(BaseModel):
    model_version: str
    previous_model_version: str | None
    run: str


class HealthOut(BaseModel):
    status: str
    model_version: str | None = None
    # /readyz while the state store or the audit log fails: part -> cause
    problems: dict[str, str] | None = None
