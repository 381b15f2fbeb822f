"""Poison requests against the real servers: each one dead-lettered with its reason, the good
requests behind it on the same partition deployed, every offset committed, no retry loop."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

from bridge.intake import Intake, Outcome
from bridge.settings import BridgeSettings
from dm.models import DeployRequest
from tests.system import wait_for
from tests.test_bridge_support import bridges  # noqa: F401  (fixture)

#: the producer's (and the bridge's) largest record
MAX_RECORD = 1024 * 1024


def deep(levels: int) -> str:
    """A request nested ``levels`` deep, counting the request object itself."""
    args = '{"a": ' * (levels - 2) + "{}" + "}" * (levels - 2)
    return '{"request_id": "deep", "algorithm": "hello", "args": ' + args + "}"


def huge() -> bytes:
    """A ~1 MiB request: its dead letter (value plus headers) would not fit the producer's maximum."""
    head = b'{"request_id": "huge", "algorithm": "hello", "args": {"pad": "'
    return head + b"x" * (MAX_RECORD - 64 - len(head) - 3) + b'"}}'


#: (raw request, error code, piece of the reason)
POISON: list[tuple[bytes, str, str]] = [
    (b'{"request_id": "p1", "algorithm": "hello", "args": {"n": 18446744073709551616}}', "unstorable",
     "args.n is 18446744073709551616, outside the 64-bit integer range"),
    (b'{"request_id": "p2", "algorithm": "hello", "args": {"a\\u0000b": 1}}', "unstorable", "NUL byte"),
    (b'{"request_id": "p3", "algorithm": "hello", "args": {"who": "\\ud800"}}', "unstorable", "lone surrogate"),
    (deep(100).encode(), "unstorable", "nested more than 90 levels"),
    (b'{"request_id": "p5", "algorithm": "hello", "args": {"$where": "1"}}', "unstorable", "starts with '$'"),
    (b'{"request_id": "p6", "algorithm": "hello", "args": {"a.b": 1}}', "unstorable", "holds a '.'"),
    (huge(), "too_large", "over the limit of 262144"),
    (b'{"request_id": "p8", "algorithm": "hello", "arg": {"n": 1}}', "unknown_field",
     "unknown field(s) 'arg' (did you mean 'args' for 'arg'?)"),
]  # fmt: skip
#: good requests after each poison one
GOOD_AFTER = 2
#: what a bridge stuck on a batch logs
LOOPING = ("retrying", "unexpected error", "restarting", "Traceback", "splitting")


def test_each_poison_request_is_dead_lettered_and_the_good_ones_behind_it_are_deployed(make_system, bridges):  # noqa: F811
    # Given a bridge (whose producer takes records up to 1 MiB) and a stream on one partition
    # where each kind of poison request is followed by good ones
    system = make_system(nodes=1)
    system.add_examples("hello")
    kafka = bridges(system)
    kafka.start()
    stream: list[tuple[bytes, bytes]] = []  # (key, value)
    for i, (raw, _, _) in enumerate(POISON):
        stream.append((b"poison-%d" % i, raw))
        for j in range(GOOD_AFTER):
            good = {"request_id": f"good-{i}-{j}", "algorithm": "hello", "args": {"n": j}}
            stream.append((good["request_id"].encode(), json.dumps(good).encode()))

    # When they are sent (a producer that takes the ~1 MiB one)
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, max_request_size=2 * MAX_RECORD, linger_ms=5)
    try:
        sent = [producer.send(kafka.requests, key=k, value=v, partition=0) for k, v in stream]
        producer.flush()
        offsets = [f.get(timeout=30).offset for f in sent]
    finally:
        producer.close()

    # Then each poison request is in the DLQ once, with its reason, where it was, and its bytes
    letters = kafka.read_dead_letters(len(POISON), timeout=90)
    assert len(letters) == len(POISON), [d.reason for d in letters]
    by_offset = {d.offset: d for d in letters}
    for i, (raw, code, reason) in enumerate(POISON):
        letter = by_offset[offsets[i * (GOOD_AFTER + 1)]]
        assert (letter.topic, letter.partition, letter.key) == (kafka.requests, 0, b"poison-%d" % i)
        assert letter.error == code, letter.reason
        assert reason in letter.reason, f"poison {i}: {letter.reason!r} does not say {reason!r}"
        if len(raw) < 64 * 1024:
            assert letter.value == raw and not letter.truncated
        else:  # cut to fit the producer, its full size and sha256 in the headers
            assert letter.truncated and letter.value and raw.startswith(letter.value)
            assert len(letter.value) < MAX_RECORD - 512
            assert (letter.size, letter.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    # and every good one behind them is deployed and runs
    good = len(POISON) * GOOD_AFTER
    system.wait_all_succeeded(good, 90)
    # and every offset is committed, with no loop over a batch in the bridge's log
    wait_for(lambda: kafka.committed() == len(stream), 30, what="every offset committed")
    log = kafka.log()
    assert not [line for line in log.splitlines() if any(word in line for word in LOOPING)], log[-3000:]
    assert log.count("to the DLQ") >= len(POISON)


def test_a_write_mongodb_refuses_is_split_until_only_the_offending_requests_are_left_out(make_system):
    # Given requests that skipped the screening (as a kind the check does not know would),
    # three of which BSON cannot encode, among good ones, in one batch
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    algorithm = system.ctl.registry.get_algorithm("hello", None)
    poison: dict[int, dict[str, Any]] = {7: {"n": 2**64}, 8: {"a\x00b": 1}, 30: {"who": "\udc80"}}
    outcome = Outcome()
    for i in range(40):
        record = SimpleNamespace(topic="req", partition=0, offset=i, key=None, value=b"{}", timestamp=None)
        outcome.accepted.append((record, DeployRequest("hello", poison.get(i, {"n": i}), f"split-{i}"), algorithm))
    intake = Intake(system.ctl, BridgeSettings(bootstrap="unused:1"), tasks=SimpleNamespace(send=lambda docs: None))  # type: ignore[arg-type]

    # When the batch is recorded
    intake.record(outcome)

    # Then the three are dead letters naming MongoDB's refusal, and all the others are recorded, once
    assert sorted(d.offset for d in outcome.dead) == sorted(poison)
    assert all(d.reason.startswith("MongoDB refused to store this request") for d in outcome.dead)
    stored = {d["request_id"] for d in system.ctl.registry.deployments.find({}, {"request_id": 1})}
    assert stored == {f"split-{i}" for i in range(40) if i not in poison}
    assert sorted(d["request_id"] for d in outcome.deploy) == sorted(stored)
