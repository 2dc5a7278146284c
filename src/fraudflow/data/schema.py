"""The canonical transaction schema and the rules every raw log must meet.

Canonical columns:
    transaction_id  str or int, unique
    timestamp       UTC datetime (microseconds)
    customer_id     str or int (the card / account)
    terminal_id     str or int (the merchant terminal)
    amount          float, finite and >= 0
    is_fraud        optional, 0 or 1
Any other column is carried along untouched. One of them has a meaning for evaluation:
    fraud_scenario  optional label detail: the fraud scenario of a fraud row (the simulator's
                    names), "" for a legitimate row. Evaluation breaks metrics down by it; it is
                    a label, so it is never a feature.
"""

from __future__ import annotations

__all__ = [
    "AMOUNT",
    "CUSTOMER_ID",
    "FRAUD_SCENARIO",
    "IS_FRAUD",
    "REQUIRED_COLUMNS",
    "TERMINAL_ID",
    "TIMESTAMP",
    "TRANSACTION_ID",
]

TRANSACTION_ID = "transaction_id"
TIMESTAMP = "timestamp"
CUSTOMER_ID = "customer_id"
TERMINAL_ID = "terminal_id"
AMOUNT = "amount"
IS_FRAUD = "is_fraud"
FRAUD_SCENARIO = "fraud_scenario"

REQUIRED_COLUMNS: tuple[str, ...] = (TRANSACTION_ID, TIMESTAMP, CUSTOMER_ID, TERMINAL_ID, AMOUNT)
