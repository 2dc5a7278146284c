"""The replay record: a response packed small, rebuilt byte for byte, and the Redis ledger
that keeps it (on a real redis-server)."""

import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from fraudflow.serve.audit import DecisionRecord
from fraudflow.serve.idempotency import RedisLedger
from fraudflow.serve.policy import FEATURE_DETAIL
from fraudflow.serve.replay_record import COMPACT, TEXT, Vocabulary, pack_response, unpack_response
from tests.helpers.redis_server import REDIS_SERVER, needs_redis, redis_server

NAMES = ("customer__count__1h", "customer__mean_amount__7d", "tx__log_amount", "odd%name")
VERSION = "gbdt-20261205-abc"
VOCABULARY = Vocabulary(VERSION, NAMES)


def _feature(name: str, value: float, contribution: float) -> dict[str, Any]:
    """A feature reason as the engine words it (``fraudflow.serve.scoring``); a NaN value is
    written "nan" in the detail and null in JSON."""
    way = "raised" if contribution >= 0 else "lowered"
    detail = (name.replace("%", "%%") + FEATURE_DETAIL) % (value, way, abs(contribution))
    shown = None if math.isnan(value) else value
    return {"kind": "feature", "name": name, "detail": detail, "value": shown,
            "contribution": contribution}  # fmt: skip


def _body(tid: str | int, reasons: list[dict[str, Any]], decision: str = "approve") -> bytes:
    return orjson.dumps(
        {"transaction_id": tid, "score": 0.012345678901234567, "decision": decision,
         "reasons": reasons, "model_version": VERSION}
    )  # fmt: skip


# Every form of a feature value: small integer, hundredths, any float, null, -0.0, a large one.
FEATURES = [
    _feature("customer__count__1h", 7.0, 0.8123456789012345),
    _feature("customer__mean_amount__7d", 52.37, -0.2049382716049383),
    _feature("tx__log_amount", 3.9589108453968193, 0.0),
]
ODD = [
    _feature("odd%name", math.nan, -1e-300),
    _feature("customer__count__1h", -0.0, 2.5),
    _feature("tx__log_amount", 1e300, -0.5),
]
THRESHOLD = {"kind": "threshold", "name": "review", "detail": "score 0.7000 >= review threshold "
             "0.5", "value": 0.7, "contribution": None}  # fmt: skip


@pytest.mark.parametrize(
    ("tid", "reasons", "decision"),
    [
        ("tx-1", FEATURES, "approve"),
        (42, FEATURES, "approve"),  # an integer id is answered as an integer
        ("tx-2", ODD, "approve"),
        ("tx-3", [THRESHOLD, *FEATURES], "review"),
        ("tx-4", [], "block"),
    ],
)
def test_a_response_is_rebuilt_byte_for_byte_from_its_compact_record(
    tid: str | int, reasons: list[dict[str, Any]], decision: str
) -> None:
    body = _body(tid, reasons, decision)
    packed = pack_response(str(tid), body, VOCABULARY)
    assert packed[0] & COMPACT
    assert unpack_response(str(tid), packed, {VOCABULARY.ref: VOCABULARY}.get) == body


def test_the_usual_approval_keeps_its_numbers_and_little_else() -> None:
    body = _body("tx-1", FEATURES)
    # head 13 bytes; per reason 1 + the value (1, 4, 8) + 8 for the contribution
    assert len(pack_response("tx-1", body, VOCABULARY)) == 13 + 10 + 13 + 17 < len(body) / 10


@pytest.mark.parametrize(
    "body",
    [
        _body("tx-1", FEATURES).replace(VERSION.encode(), b"another-model"),  # not its model
        _body("tx-1", [{**FEATURES[0], "detail": "worded otherwise"}]),
        _body("tx-1", [FEATURES[0], THRESHOLD]),  # a policy reason after the features
        _body("tx-1", [{**FEATURES[0], "name": "not_a_feature_of_it"}]),
        _body("tx-1", FEATURES * 3),  # more than 7 feature reasons
        _body("other-id", FEATURES),
        b'{"transaction_id":"tx-1","score":1,"extra":true}',
        b"not json",
    ],
)
def test_what_the_compact_form_cannot_rebuild_is_kept_whole(body: bytes) -> None:
    packed = pack_response("tx-1", body, VOCABULARY)
    assert packed[0] == TEXT
    assert unpack_response("tx-1", packed, {}.get) == body


def test_a_record_is_rebuilt_with_the_wording_of_its_vocabulary() -> None:
    """A later version that words feature reasons otherwise still answers the first words."""
    old = Vocabulary(VERSION, NAMES, " is %g and %s the risk by %.3f")
    reason = {**FEATURES[0], "detail": "customer__count__1h is 7 and raised the risk by 0.812"}
    body = _body("tx-1", [reason])
    packed = pack_response("tx-1", body, old)
    assert packed[0] & COMPACT and old.ref != VOCABULARY.ref
    assert unpack_response("tx-1", packed, {old.ref: old}.get) == body


def test_an_unknown_format_is_refused_and_a_lost_vocabulary_finds_nothing() -> None:
    with pytest.raises(ValueError, match="unknown response format b'\\\\x07' in Redis"):
        unpack_response("tx-1", b"\x07abc", {}.get)
    packed = pack_response("tx-1", _body("tx-1", FEATURES), VOCABULARY)
    assert unpack_response("tx-1", packed, {}.get) is None


# --- the ledger on a real redis-server ----------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    if REDIS_SERVER is None:
        yield None
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _record(tid: str, body: bytes) -> DecisionRecord:
    return DecisionRecord(tid, 0, "c", "t", 1.0, 0.0123, 0.0123, "approve", VERSION, 0, b"",
                          body, NAMES)  # fmt: skip


@needs_redis
def test_the_ledger_answers_after_a_restart_from_a_record_of_at_most_150_bytes(
    redis_url: str,
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    bodies = {f"tx-{i}": _body(f"tx-{i}", FEATURES) for i in range(3)}
    ledger = RedisLedger(redis_url, ttl_seconds=3_600, prefix=prefix)
    ledger.put([_record(tid, body) for tid, body in bodies.items()])
    # The first answer stays: a second put of the same id changes nothing.
    ledger.put([_record("tx-0", _body("tx-0", ODD))])
    ledger.close()
    restarted = RedisLedger(redis_url, ttl_seconds=3_600, prefix=prefix)  # nothing cached
    assert {tid: restarted.get(tid) for tid in bodies} == bodies
    assert restarted.get("tx-9") is None
    with redis.Redis.from_url(redis_url) as client:
        key = restarted.key("tx-0")
        assert (client.get(key) or b"\x00")[0] & COMPACT
        assert 0 < int(client.memory_usage(key, samples=0) or 0) <= 150
        # The vocabulary outlives every record written with it.
        assert client.ttl(restarted.vocabulary_key(VOCABULARY.ref)) > client.ttl(key) > 3_500
    restarted.close()


@needs_redis
def test_a_vocabulary_reference_taken_by_another_keeps_responses_whole(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    ledger = RedisLedger(redis_url, ttl_seconds=3_600, prefix=prefix)
    with redis.Redis.from_url(redis_url) as client:
        client.set(ledger.vocabulary_key(VOCABULARY.ref), b'["someone else", [], ""]')
        body = _body("tx-1", FEATURES)
        ledger.put([_record("tx-1", body)])
        assert (client.get(ledger.key("tx-1")) or b"")[:1] == bytes([TEXT])
    assert ledger.get("tx-1") == body
    ledger.close()


def test_ledger_keys_stay_in_their_transaction_slot(tmp_path: Path) -> None:
    ledger = RedisLedger("redis://127.0.0.1:1/0", ttl_seconds=60)  # connects lazily
    assert ledger.key("tx-1") == "fraudflow:{t:tx-1}r"
    assert ledger.vocabulary_key(b"\x01\x02\x03\x04") == "fraudflow:{v:01020304}"
    ledger.close()
