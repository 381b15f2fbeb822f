"""Poison requests with no server: what MongoDB can store, outage or permanent, the split write,
dead letters that fit the producer, unknown fields, and the Kafka security settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bson
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kombu.exceptions import OperationalError as KombuOperationalError
from pymongo import errors as mongo
from redis import exceptions as redis_errors

from bridge import broker
from bridge.intake import Intake
from bridge.messages import DeadLetter, Rejected, decode_request
from bridge.settings import BridgeSettings
from dm.errors import ConfigError, RegistryUnavailable
from dm.models import DeployRequest
from dm.outage import TRANSIENT, is_outage
from dm.storable import MAX_DEPTH, Unstorable, check_storable

pytestmark = pytest.mark.unit


def nested(levels: int) -> dict[str, Any]:
    """A request whose args are nested so the whole object is ``levels`` deep."""
    inner: dict[str, Any] = {}
    for _ in range(levels - 2):
        inner = {"a": inner}
    return {"request_id": "r", "algorithm": "hello", "args": inner}


# -- what MongoDB can store ---------------------------------------------------------

#: (request, piece of the reason)
UNSTORABLE: list[tuple[dict[str, Any], str]] = [
    ({"args": {"n": 2**64}}, "args.n is 18446744073709551616, outside the 64-bit integer range"),
    ({"args": {"n": -(2**63) - 1}}, "outside the 64-bit integer range"),
    ({"args": {"xs": [1, 2, 2**63]}}, "args.xs[2] is 9223372036854775808"),
    ({"args": {"a\x00b": 1}}, "NUL byte"),
    ({"args": {"$where": "1"}}, "starts with '$'"),
    ({"args": {"deep": {"a.b": 1}}}, "the key 'a.b' in args.deep holds a '.'"),
    ({"args": {"s": "ok \ud800"}}, "args.s holds '\\ud800' at position 3, a lone surrogate"),
    ({"args": {"\udfff": 1}}, "lone surrogate"),
    ({"request_id": "r\udc80"}, "request_id holds '\\udc80'"),
    (nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels"),
    (nested(100), "nested more than"),
]


@pytest.mark.parametrize(("request_", "reason"), UNSTORABLE)
def test_a_value_mongodb_cannot_store_is_named_in_the_reason(request_: dict[str, Any], reason: str) -> None:
    with pytest.raises(Unstorable) as caught:
        check_storable({"request_id": "r", "algorithm": "hello", **request_})
    assert reason in str(caught.value)


def test_what_passes_the_check_is_what_bson_encodes() -> None:
    good = {"n": 2**63 - 1, "m": -(2**63), "f": 1e308, "s": "é\x00 ✓ 😀", "b": True, "z": None, "l": [[{"k": 1}]]}
    for request in ({"request_id": "r", "algorithm": "hello", "args": good}, nested(MAX_DEPTH)):
        check_storable(request)
        bson.encode(request)


def test_what_bson_refuses_the_check_refuses_first() -> None:
    for request, _ in UNSTORABLE[:4] + UNSTORABLE[6:8]:
        doc = {"request_id": "r", "algorithm": "hello", **request}
        with pytest.raises((OverflowError, bson.errors.InvalidDocument, UnicodeEncodeError)):
            bson.encode(doc)
        with pytest.raises(Unstorable):
            check_storable(doc)


def test_decoding_refuses_an_unstorable_request_before_any_write() -> None:
    raw = b'{"request_id": "p1", "algorithm": "hello", "args": {"n": 18446744073709551616}}'
    with pytest.raises(Rejected) as caught:
        decode_request(raw, 4096, 64)
    assert caught.value.code == "unstorable" and "64-bit integer range" in str(caught.value)
    with pytest.raises(Rejected, match="lone surrogate"):
        decode_request(b'{"request_id": "p2", "algorithm": "hello", "args": {"s": "\\ud800"}}', 4096, 64)


def test_an_unknown_top_level_field_is_refused_naming_it_and_guessing_the_intent() -> None:
    with pytest.raises(Rejected) as caught:
        decode_request(b'{"request_id": "r", "algorithm": "hello", "arg": {"n": 1}}', 4096, 64)
    assert caught.value.code == "unknown_field"
    assert "unknown field(s) 'arg'" in str(caught.value) and "did you mean 'args' for 'arg'" in str(caught.value)
    with pytest.raises(Rejected, match="'priority'"):
        decode_request(b'{"request_id": "r", "algorithm": "hello", "priority": 1}', 4096, 64)


# -- outage or permanent: one test per class ----------------------------------------

OUTAGES: list[BaseException] = [
    mongo.ConnectionFailure("down"),
    mongo.AutoReconnect("reconnect"),
    mongo.NetworkTimeout("timed out"),
    mongo.ServerSelectionTimeoutError("no server"),
    mongo.NotPrimaryError("stepped down"),
    mongo.WaitQueueTimeoutError("pool"),
    mongo.WriteConcernError("wtimeout", 64),
    mongo.OperationFailure("not primary", 10107),
    mongo.OperationFailure("shutting down", 91),
    mongo.OperationFailure("not authorized on dm", 13),
    mongo.OperationFailure("labelled", 1, {"errorLabels": ["RetryableWriteError"]}),
    mongo.BulkWriteError({"writeErrors": [], "writeConcernErrors": [{"code": 64}]}),
    redis_errors.ConnectionError("refused"),
    redis_errors.TimeoutError("timeout"),
    redis_errors.BusyLoadingError("loading"),
    redis_errors.AuthenticationError("bad password"),
    redis_errors.ReadOnlyError("replica"),
    KombuOperationalError("broker down"),
    RegistryUnavailable("MongoDB is down"),
]
PERMANENT: list[BaseException] = [
    OverflowError("MongoDB can only handle up to 8-byte ints"),
    bson.errors.InvalidDocument("Key names must not contain the NULL byte"),
    bson.errors.InvalidStringData("bad"),
    bson.errors.InvalidBSON("bad"),
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ValueError("bad value"),
    TypeError("not a document"),
    mongo.OperationFailure("FieldPath field names may not start with '$'", 52),
    mongo.OperationFailure("BSONObjectTooLarge", 10334),
    mongo.DocumentTooLarge("too large"),
    mongo.BulkWriteError({"writeErrors": [{"index": 0, "code": 2, "errmsg": "bad"}]}),
    mongo.BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 1, "code": 91}]}),
    redis_errors.ResponseError("WRONGTYPE"),
]


@pytest.mark.parametrize("exc", OUTAGES, ids=lambda e: f"{type(e).__name__}-{e}"[:60])
def test_an_outage_is_retried_never_dead_lettered(exc: BaseException) -> None:
    assert is_outage(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: f"{type(e).__name__}-{e}"[:60])
def test_a_permanent_error_is_not_an_outage(exc: BaseException) -> None:
    assert not is_outage(exc)


def test_the_celery_tasks_retry_only_the_outages_a_type_decides() -> None:
    from dm import tasks

    assert tasks.TRANSIENT is TRANSIENT
    assert not any(isinstance(exc, TRANSIENT) for exc in PERMANENT)
    assert not issubclass(mongo.OperationFailure, TRANSIENT)


# -- the split write ----------------------------------------------------------------


class PoisonRegistry:
    """create_deployments as MongoDB would do it, refusing any batch holding a poisoned arg."""

    def __init__(self, refuse: BaseException) -> None:
        self.refuse, self.writes, self.stored = refuse, [], {}  # type: ignore[var-annotated]

    def create_deployments(self, items: list[tuple[DeployRequest, Any]]) -> list[tuple[dict[str, Any], bool]]:
        self.writes.append(len(items))
        if any(request.args.get("poison") for request, _ in items):
            raise self.refuse
        out = []
        for request, _ in items:
            known = request.request_id in self.stored
            doc = self.stored.setdefault(request.request_id, {"_id": f"d-{request.request_id}", "state": "pending"})
            out.append((doc, not known))
        return out


def intake_for(registry: Any) -> tuple[Intake, Any]:
    ctl = SimpleNamespace(registry=registry)
    return Intake(ctl, BridgeSettings(bootstrap="k:1"), tasks=SimpleNamespace(send=lambda docs: None)), ctl  # type: ignore[arg-type]


def batch(poisoned: set[int], size: int = 64) -> Any:
    from bridge.intake import Outcome

    outcome = Outcome()
    for i in range(size):
        record = SimpleNamespace(topic="t", partition=0, offset=i, key=b"k", value=b"v%d" % i, timestamp=1)
        request = DeployRequest("hello", {"poison": i in poisoned}, f"r{i}")
        outcome.accepted.append((record, request, {"_id": "a"}))
    return outcome


def test_a_write_refused_for_a_permanent_reason_is_split_until_each_poison_is_alone() -> None:
    registry = PoisonRegistry(OverflowError("MongoDB can only handle up to 8-byte ints"))
    intake, _ = intake_for(registry)
    outcome = batch({3, 40, 41})
    intake.record(outcome)
    assert sorted(d.offset for d in outcome.dead) == [3, 40, 41]
    assert all("MongoDB refused to store this request (OverflowError" in d.reason for d in outcome.dead)
    assert {d.error for d in outcome.dead} == {"unstorable"}
    assert sorted(registry.stored) == sorted(f"r{i}" for i in range(64) if i not in (3, 40, 41))
    assert len(outcome.deploy) == 61 and outcome.created == 61
    assert len(registry.writes) < 40  # a split, not one write per request


def test_a_write_that_fails_for_an_outage_is_not_split_and_dead_letters_nothing() -> None:
    registry = PoisonRegistry(mongo.AutoReconnect("connection reset"))
    intake, _ = intake_for(registry)
    outcome = batch({3})
    with pytest.raises(mongo.AutoReconnect):
        intake.record(outcome)
    assert registry.writes == [64] and outcome.dead == []


# -- dead letters fit the producer --------------------------------------------------


def test_a_dead_letter_too_large_for_the_producer_is_cut_with_its_size_and_sha256_in_headers() -> None:
    value = b"x" * (1024 * 1024 - 100)
    letter = DeadLetter("dm.requests", 0, 7, "the message has too many bytes", "too_large", b"key", value, 1)
    fitted = letter.fitted(1024 * 1024)
    size = len(fitted.key or b"") + len(fitted.value or b"") + sum(len(k) + len(v) for k, v in fitted.headers())
    assert size < 1024 * 1024 - 256
    assert fitted.truncated and value.startswith(fitted.value or b"-")
    headers = dict(fitted.headers())
    assert headers["dm.size"] == str(len(value)).encode()
    assert headers["dm.sha256"] == hashlib.sha256(value).hexdigest().encode()
    back = DeadLetter.from_record(fitted.key, fitted.value, fitted.headers())
    assert (back.size, back.sha256, back.offset) == (len(value), hashlib.sha256(value).hexdigest(), 7)
    small = DeadLetter("t", 0, 1, "why", "bad_request", None, b"{}")
    assert small.fitted(1024 * 1024) is small and not small.truncated


def test_a_reason_quoting_bad_input_is_still_a_header() -> None:
    letter = DeadLetter("t", 0, 1, "key '\ud800' " + "x" * 5000, "unstorable", None, b"{}")
    reason = dict(letter.headers())["dm.reason"]
    assert len(reason) < 2100 and reason.startswith(b"key '\\ud800'")


# -- Kafka security settings --------------------------------------------------------

SECRET = "s3cret-do-not-log"


def sasl_env(tmp_path: Path, mechanism: str = "PLAIN") -> dict[str, str]:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return {
        "DM_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "DM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "DM_KAFKA_SASL_MECHANISM": mechanism,
        "DM_KAFKA_SASL_USERNAME": "bridge",
        "DM_KAFKA_SASL_PASSWORD": SECRET,
        "DM_KAFKA_SSL_CAFILE": str(ca),
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_sasl_and_tls_settings_reach_kafka_pythons_clients(tmp_path: Path, mechanism: str) -> None:
    # Given DM_KAFKA_* settings for SASL over TLS
    settings = BridgeSettings.from_env(sasl_env(tmp_path, mechanism))
    expected = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "bridge",
        "sasl_plain_password": SECRET,
        "ssl_cafile": str(tmp_path / "ca.pem"),
        "ssl_check_hostname": True,
    }
    # When the bridge's clients are made from it (nothing listens: an api_version, so they never connect)
    producer = KafkaProducer(**broker.producer_config(settings), api_version=(2, 5))
    consumer = KafkaConsumer(**broker.consumer_config(settings), api_version=(2, 5))
    admin_config = broker._common(settings)
    try:
        # Then each one's own config carries them
        for client in (producer, consumer):
            assert {k: client.config[k] for k in expected} == expected
        assert producer.config["max_request_size"] == settings.max_request_size
        assert {k: admin_config[k] for k in expected} == expected  # the admin client (topics) too
    finally:
        producer.close(timeout=0)
        consumer.close()


def test_the_password_is_in_no_repr_and_can_come_from_a_file(tmp_path: Path) -> None:
    env = sasl_env(tmp_path)
    settings = BridgeSettings.from_env(env)
    assert SECRET not in repr(settings) and SECRET not in settings.security.describe()
    assert settings.security.describe() == "SASL_SSL (PLAIN as bridge)"
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    env.pop("DM_KAFKA_SASL_PASSWORD")
    from_file = BridgeSettings.from_env({**env, "DM_KAFKA_SASL_PASSWORD_FILE": str(secret_file)})
    assert from_file.security.client_config()["sasl_plain_password"] == SECRET


def test_plaintext_is_the_default_and_passes_no_sasl_or_tls_settings() -> None:
    config = BridgeSettings.from_env({"DM_KAFKA_BOOTSTRAP": "k:1"}).security.client_config()
    assert config == {"security_protocol": "PLAINTEXT"}
    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", api_version=(2, 5), **config)
    producer.close(timeout=0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "use one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ({"DM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs DM_KAFKA_SASL_MECHANISM"),
        ({"DM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "DM_KAFKA_SASL_MECHANISM": "GSSAPI"}, "got 'GSSAPI'"),
        ({"DM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "DM_KAFKA_SASL_MECHANISM": "PLAIN"}, "SASL_USERNAME"),
        ({"DM_KAFKA_SASL_MECHANISM": "PLAIN", "DM_KAFKA_SASL_USERNAME": "u"}, "set it to SASL_SSL"),
        ({"DM_KAFKA_SECURITY_PROTOCOL": "SSL", "DM_KAFKA_SSL_CAFILE": "/no/such/ca.pem"}, "not a readable file"),
        ({"DM_KAFKA_SSL_CHECK_HOSTNAME": "maybe"}, "not a valid bool"),
    ],
)
def test_a_wrong_security_setting_is_a_config_error_that_says_what_to_set(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        BridgeSettings.from_env({"DM_KAFKA_BOOTSTRAP": "k:1", "DM_KAFKA_SASL_PASSWORD": SECRET, **env})
    assert SECRET not in str(caught.value)


def test_json_of_a_request_round_trips_through_the_check() -> None:
    raw = json.dumps({"request_id": "r", "algorithm": "hello", "args": {"x": [1, {"y": "z"}]}}).encode()
    assert decode_request(raw, 4096, 64).args == {"x": [1, {"y": "z"}]}


class SmallBroker:
    """A producer whose broker takes records up to ``limit`` bytes (its message.max.bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.stored = limit, []  # type: ignore[var-annotated]

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> Any:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        error = None
        if size > self.limit:
            from kafka.errors import MessageSizeTooLargeError

            error = MessageSizeTooLargeError(f"{size} bytes")
        else:
            self.stored.append((key, value, headers))

        def get(timeout: float) -> None:
            if error is not None:
                raise error

        return SimpleNamespace(get=get)

    def flush(self, timeout: float) -> None:
        pass


def test_a_dead_letter_the_broker_refuses_as_too_large_is_sent_again_cut_smaller() -> None:
    import threading

    from bridge.consumer import DLQ_FALLBACK_BYTES, RequestConsumer
    from bridge.intake import Outcome

    # Given a broker that takes less than the producer's maximum, and a batch with a large dead letter
    intake = SimpleNamespace(record=lambda outcome: None, enqueue=lambda outcome: None)
    consumer = RequestConsumer(BridgeSettings(bootstrap="k:1"), intake, threading.Event())  # type: ignore[arg-type]
    value = b"x" * 500_000
    outcome = Outcome(dead=[DeadLetter("req", 0, 9, "too large", "too_large", b"k", value, 1)])
    broker_ = SmallBroker(limit=200_000)
    # When the batch is delivered
    consumer._deliver(broker_, outcome)  # type: ignore[arg-type]
    consumer.pool.shutdown()
    # Then the dead letter is in the DLQ, cut to the fallback size, with the original's size and hash
    [(_, stored, headers)] = broker_.stored
    assert len(stored) < DLQ_FALLBACK_BYTES and value.startswith(stored)
    assert dict(headers)["dm.sha256"] == hashlib.sha256(value).hexdigest().encode()
