"""A decision's response packed small for the idempotency window, and rebuilt byte for byte.

A response (``DecisionOut``) is mostly what every response of its model shares: the JSON
keys, the model version, the feature names, the wording of feature reasons. Those are kept
once per model, in a ``Vocabulary`` that the store keeps beside the records (named by a
4-byte reference, a hash of its content); a record keeps the rest, in binary:

    byte 0      bit 7 set: this form (``COMPACT``); bits 0-1 the decision (``ACTIONS``
                order); bit 2 the transaction_id was sent as an integer; bit 3 policy reasons
                (thresholds, rules) come first; bits 4-6 the number of feature reasons
    bytes 1-4   the vocabulary's reference
    8 bytes     the score, float64
    per feature reason: a byte, the form of its value (bits 6-7: ``_VALUE_FORMS``) and the
                feature's position among the vocabulary's names (bits 0-5); the value in that
                form; the contribution, float64
    the rest    the policy reasons as JSON, raw DEFLATE (review and block decisions only)

Floats are kept as float64, every bit, so the JSON rebuilt is the JSON sent. A response this
form cannot rebuild exactly (another shape, a feature past the 64th, a detail worded
otherwise) is kept whole, compressed (``TEXT``): ``pack_response`` checks by rebuilding. Any
change to how a record is rebuilt needs a new format byte; records of a format this version
does not read are refused (``ValueError``), not misread.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fraudflow.serve.policy import ACTIONS, FEATURE_DETAIL

__all__ = [
    "COMPACT",
    "TEXT",
    "Vocabulary",
    "pack_response",
    "unpack_response",
]

TEXT = 0x02  # then raw DEFLATE of the whole body, with _RESPONSE_WORDS
COMPACT = 0x80  # the bit of the binary form above

_KEYS = ["transaction_id", "score", "decision", "reasons", "model_version"]
_REASON_KEYS = ["kind", "name", "detail", "value", "contribution"]
_MAX_FEATURES = 64  # positions fit in 6 bits
_MAX_REASONS = 7  # a count in 3 bits
_HEAD = struct.Struct("<B4sd")  # form and flags, vocabulary reference, score
_F64 = struct.Struct("<d")
_I8 = struct.Struct("<b")
_I32 = struct.Struct("<i")
# A feature value's forms: a small integer (int8), hundredths (int32: amounts), any float64,
# or null.
_SMALL, _HUNDREDTHS, _FLOAT, _NULL = range(4)


@dataclass(frozen=True)
class Vocabulary:
    """What every response of one model shares: its version, its feature names (the model's,
    in order) and the detail of a feature reason after the name (``FEATURE_DETAIL``)."""

    model_version: str
    names: tuple[str, ...]
    detail: str = FEATURE_DETAIL
    content: bytes = field(init=False, repr=False, compare=False)
    ref: bytes = field(init=False, repr=False, compare=False)
    _positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        content = orjson.dumps([self.model_version, list(self.names), self.detail])
        object.__setattr__(self, "content", content)
        object.__setattr__(self, "ref", hashlib.blake2b(content, digest_size=4).digest())
        positions = {name: k for k, name in enumerate(self.names[:_MAX_FEATURES])}
        object.__setattr__(self, "_positions", positions)

    @classmethod
    def parse(cls, content: bytes) -> Vocabulary:
        version, names, detail = orjson.loads(content)
        return cls(version, tuple(names), detail)

    def position(self, name: Any) -> int | None:
        return self._positions.get(name) if isinstance(name, str) else None


def pack_response(transaction_id: str, body: bytes, vocabulary: Vocabulary | None) -> bytes:
    """The response ``body`` of ``transaction_id``, as small as it can be rebuilt exactly:
    ``COMPACT`` with ``vocabulary`` where it fits, else ``TEXT``."""
    if vocabulary is not None:
        packed = _pack_compact(transaction_id, body, vocabulary)
        if packed is not None and _rebuild(transaction_id, packed, vocabulary) == body:
            return packed
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=_RESPONSE_WORDS)
    return bytes([TEXT]) + packer.compress(body) + packer.flush()


def unpack_response(
    transaction_id: str, packed: bytes, vocabulary: Callable[[bytes], Vocabulary | None]
) -> bytes | None:
    """The body ``pack_response`` packed; None where its vocabulary is gone (``vocabulary``
    finds one by reference). Raises ``ValueError`` for a format this version does not read."""
    form = packed[:1]
    if form == bytes([TEXT]):
        return _inflate(packed[1:], _RESPONSE_WORDS)
    if form and form[0] & COMPACT and len(packed) >= _HEAD.size:
        found = vocabulary(packed[1:5])
        return None if found is None else _rebuild(transaction_id, packed, found)
    raise ValueError(f"unknown response format {form!r} in Redis")


def _pack_compact(transaction_id: str, body: bytes, vocabulary: Vocabulary) -> bytes | None:
    """``COMPACT`` of ``body``, or None where its shape does not fit (unchecked: see
    ``pack_response``)."""
    try:
        out = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(out, dict) or list(out) != _KEYS:
        return None
    tid, score, decision, reasons, version = out.values()
    if (
        version != vocabulary.model_version
        or type(score) is not float
        or decision not in ACTIONS
        or not isinstance(reasons, list)
        or str(tid) != transaction_id
    ):
        return None
    n_policy = next((k for k, r in enumerate(reasons) if _is_feature(r)), len(reasons))
    features = reasons[n_policy:]
    if len(features) > _MAX_REASONS or not all(_is_feature(r) for r in features):
        return None
    flags = ACTIONS.index(decision) | (type(tid) is int) << 2 | bool(n_policy) << 3
    parts = [_HEAD.pack(COMPACT | flags | len(features) << 4, vocabulary.ref, score)]
    for reason in features:
        packed = _pack_feature(reason, vocabulary)
        if packed is None:
            return None
        parts.append(packed)
    if n_policy:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=_RESPONSE_WORDS)
        parts += [packer.compress(orjson.dumps(reasons[:n_policy])), packer.flush()]
    return b"".join(parts)


def _is_feature(reason: Any) -> bool:
    return isinstance(reason, dict) and list(reason) == _REASON_KEYS and reason["kind"] == "feature"


def _pack_feature(reason: dict[str, Any], vocabulary: Vocabulary) -> bytes | None:
    position = vocabulary.position(reason["name"])
    value, contribution = reason["value"], reason["contribution"]
    if position is None or type(contribution) is not float:
        return None
    if value is None:
        return bytes([_NULL << 6 | position]) + _F64.pack(contribution)
    if type(value) is not float:
        return None
    if math.copysign(1.0, value) < 0 and value == 0:  # -0.0: neither int8 nor int32 keeps it
        head, packed = _FLOAT, _F64.pack(value)
    elif value.is_integer() and -128 <= value <= 127:
        head, packed = _SMALL, _I8.pack(int(value))
    elif abs(value) < 2**31 / 100 and round(value * 100) / 100 == value:
        head, packed = _HUNDREDTHS, _I32.pack(round(value * 100))
    else:
        head, packed = _FLOAT, _F64.pack(value)
    return bytes([head << 6 | position]) + packed + _F64.pack(contribution)


def _rebuild(transaction_id: str, packed: bytes, vocabulary: Vocabulary) -> bytes | None:
    """The body of a ``COMPACT`` record; None where the record is malformed."""
    try:
        flags, _, score = _HEAD.unpack_from(packed)
        at = _HEAD.size
        features = []
        for _ in range(flags >> 4 & 7):
            reason, at = _unpack_feature(packed, at, vocabulary)
            features.append(reason)
        policy: list[Any] = []
        if flags & 8:
            policy = orjson.loads(_inflate(packed[at:], _RESPONSE_WORDS))
        elif at != len(packed):
            return None
    except (struct.error, IndexError, TypeError, ValueError, zlib.error):
        return None
    tid: str | int = int(transaction_id) if flags & 4 else transaction_id
    return orjson.dumps(
        {"transaction_id": tid, "score": score, "decision": ACTIONS[flags & 3],
         "reasons": policy + features, "model_version": vocabulary.model_version}
    )  # fmt: skip


def _unpack_feature(packed: bytes, at: int, vocabulary: Vocabulary) -> tuple[dict[str, Any], int]:
    head = packed[at]
    form, name = head >> 6, vocabulary.names[head & 63]
    at += 1
    value: float | None = None
    if form == _SMALL:
        value = float(_I8.unpack_from(packed, at)[0])
        at += _I8.size
    elif form == _HUNDREDTHS:
        value = _I32.unpack_from(packed, at)[0] / 100
        at += _I32.size
    elif form == _FLOAT:
        (value,) = _F64.unpack_from(packed, at)
        at += _F64.size
    (contribution,) = _F64.unpack_from(packed, at)
    at += _F64.size
    way = "raised" if contribution >= 0 else "lowered"
    # A null value was a NaN (orjson writes NaN as null); the detail wrote it as "nan".
    shown = math.nan if value is None else value
    detail = name + vocabulary.detail % (shown, way, abs(contribution))
    reason = {"kind": "feature", "name": name, "detail": detail, "value": value,
              "contribution": contribution}  # fmt: skip
    return reason, at


def _inflate(data: bytes, words: bytes) -> bytes:
    unpacker = zlib.decompressobj(-15, zdict=words)
    return unpacker.decompress(data) + unpacker.flush()


# What responses are made of (DecisionOut's keys and usual values), as a preset dictionary:
# a response then compresses to its numbers and names. Changing it needs a new format byte.
_RESPONSE_WORDS = (
    b'"model_version":"","kind":"rule","kind":"threshold","detail":"score above the review '
    b'threshold","decision":"review","decision":"block","reasons":[],'
    b'terminal__fraud_rate__1d","terminal__fraud_rate__7d","terminal__fraud_rate__30d",'
    b'"customer__small_count__1d","customer__mean_amount__1h","customer__count__1h",'
    b'"customer__count__7d","customer__mean_amount__7d","customer__count__1d",'
    b'"customer__hours_since_prev","customer__amount_ratio__30d","tx__log_amount","tx__hour",'
    b' lowered the fraud log-odds by 0.","value":1.0,"contribution":-0.'
    b'},{"kind":"feature","name":"customer__mean_amount__1d","detail":"customer__mean_amount__'
    b' raised the fraud log-odds by 1.","value":3.0,"contribution":1.'
    b'},{"kind":"feature","name":"customer__count__30d","detail":"customer__count__30d = '
    b'"decision":"approve","reasons":[{"kind":"feature","name":"customer__mean_amount__30d",'
    b'"detail":"customer__mean_amount__30d = '
    b'{"transaction_id":"","score":0.00'
)
