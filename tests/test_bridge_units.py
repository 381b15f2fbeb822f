"""The bridge's pure parts, with no server: request decoding, message formats, event order, settings."""

from __future__ import annotations

import json

import pytest

from bridge.broker import Backoff
from bridge.messages import DeadLetter, Event, Rejected, decode_request
from bridge.settings import BridgeSettings
from dm.errors import BadRequest, ConfigError
from dm.models import DeployRequest


def decode(raw: bytes | None) -> DeployRequest:
    return decode_request(raw, max_bytes=1024, max_request_id=16)


def test_a_good_request_decodes_with_its_optional_fields() -> None:
    assert decode(b'{"request_id": "r1", "algorithm": "hello"}') == DeployRequest("hello", {}, "r1")
    full = decode(b'{"request_id": "r2", "algorithm": "hello", "version": "1.0.0", "args": {"n": 1}}')
    assert full == DeployRequest("hello", {"n": 1}, "r2", "1.0.0")


@pytest.mark.parametrize(
    ("raw", "code", "reason"),
    [
        (None, "empty", "empty"),
        (b"  \n", "empty", "empty"),
        (b"x" * 1025, "too_large", "1025 bytes, over the limit of 1024"),
        (b"\xc3\x28", "not_json", "not UTF-8"),
        (b"{", "not_json", "not valid JSON"),
        (b'{"request_id": "r", "algorithm": "a", "args": {"x": Infinity}}', "not_json", "Infinity"),
        (b'{"a": 1, "a": 2}', "not_json", "duplicate key 'a'"),
        (b"[]", "bad_request", "got list"),
        (b'{"algorithm": "a"}', "bad_request", "no 'request_id'"),
        (b'{"request_id": null, "algorithm": "a"}', "bad_request", "non-empty string, got None"),
        (b'{"request_id": "' + b"r" * 17 + b'", "algorithm": "a"}', "bad_request", "17 characters"),
        (b'{"request_id": "r", "algorithm": 1}', "bad_request", "'algorithm' has the wrong type"),
        (b'{"request_id": "r", "algorithm": "a", "args": "x=1"}', "bad_request", "'args' must be a JSON object"),
        (b'{"request_id": "r", "algorithm": "a", "extra": 1}', "unknown_field", "unknown field(s) 'extra'"),
        (b'{"request_id": "r", "algorithm": "a", "args": {"$gt": 1}}', "unstorable", "starts with '$'"),
    ],
)
def test_a_bad_request_is_rejected_with_a_code_and_a_reason(raw: bytes | None, code: str, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        decode(raw)
    assert caught.value.code == code
    assert reason in str(caught.value)


def test_a_dead_letter_keeps_the_original_bytes_and_says_where_and_why_in_headers() -> None:
    letter = DeadLetter("dm.requests", 2, 41, "not valid JSON", "not_json", b"k", b"\xff raw", 1700000000000)
    headers = letter.headers()
    assert ("dm.reason", b"not valid JSON") in headers and ("dm.offset", b"41") in headers
    assert DeadLetter.from_record(b"k", b"\xff raw", headers) == letter
    with pytest.raises(BadRequest, match="not a dm dead letter"):
        DeadLetter.from_record(None, b"x", [("other", b"1")])


def test_an_event_round_trips_as_json_keyed_by_its_deployment() -> None:
    doc = {"_id": "x", "deployment_id": "d1", "request_id": "r1", "algorithm": "hello", "state": "running",
           "node": "2", "generation": 1, "rev": 2, "time": 1.5, "reason": "started", "exit_code": None,
           "seq": 7}  # fmt: skip
    event = Event.from_doc(doc)
    assert event.key() == b"d1"
    assert json.loads(event.encode()) == {k: v for k, v in doc.items() if k not in ("_id", "seq")}
    assert Event.decode(event.encode()) == event
    with pytest.raises(BadRequest):
        Event.decode(b'{"deployment_id": "d1"}')


# -- settings and backoff ---------------------------------------------------------


def test_settings_come_from_flags_then_env_then_defaults() -> None:
    env = {"DM_KAFKA_BOOTSTRAP": "k:9092", "DM_BRIDGE_BATCH_SIZE": "50", "DM_BRIDGE_PUBLISH_EVENTS": "no"}
    s = BridgeSettings.from_env(env, group="mine")
    assert (s.bootstrap, s.batch_size, s.publish_events, s.group) == ("k:9092", 50, False, "mine")
    assert s.requests_topic == "dm.requests" and s.bootstrap_servers == ["k:9092"]
    with pytest.raises(ConfigError, match="DM_BRIDGE_LOCK_TTL='soon' is not a valid float"):
        BridgeSettings.from_env({"DM_BRIDGE_LOCK_TTL": "soon"})
    with pytest.raises(ConfigError, match="DM_KAFKA_BOOTSTRAP"):
        BridgeSettings(bootstrap="").require_bootstrap()


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(0.5, 4.0)
    delays = [backoff.next() for _ in range(6)]
    assert all(0.8 * f <= d <= f for d, f in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True))
    backoff.reset()
    assert backoff.next() <= 0.5
