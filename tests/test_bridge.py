"""The Kafka bridge against the real servers: requests in, deployments made, events out, bad ones to the DLQ."""

from __future__ import annotations

import json
from collections import defaultdict

from bridge.enqueue import DEPLOY_TASK, DeployTasks
from bridge.messages import Event
from dm import constants as c
from tests.system import wait_for
from tests.test_bridge_support import bridges  # noqa: F401  (fixture)


def by_deployment(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        out[event.deployment_id].append(event)
    return out


def test_100_requests_make_100_deployments_whose_events_reach_succeeded(make_system, bridges):  # noqa: F811
    # Given a system with two nodes, hello in the repository, and a bridge
    system = make_system(nodes=2, max_nodes=2)
    system.add_examples("hello")
    kafka = bridges(system)
    kafka.start()

    # When the scheduler sends 100 requests
    kafka.send([{"request_id": f"req-{i}", "algorithm": "hello", "args": {"n": i}} for i in range(100)])

    # Then 100 deployments succeed, and each one's events reach `succeeded` on the events topic,
    # keyed by deployment id, rev 0, 1, 2, ... in order, with its request id
    system.wait_all_succeeded(100, 90)
    deployments = {d["_id"]: d for d in system.ctl.registry.deployments.find({})}
    assert sorted(d["request_id"] for d in deployments.values()) == sorted(f"req-{i}" for i in range(100))

    def all_succeeded(events: list[Event]) -> bool:
        return {e.deployment_id for e in events if e.state == "succeeded"} == set(deployments)

    pairs = kafka.read_events(all_succeeded, timeout=30)
    for record, event in pairs:
        assert record.key == event.deployment_id.encode()
    for dep_id, events in by_deployment([e for _, e in pairs]).items():
        assert [e.rev for e in events] == list(range(len(events))), f"{dep_id}: revs out of order or missing"
        assert events[0].state == "pending" and events[-1].state == "succeeded"
        assert {"scheduled", "running"} <= {e.state for e in events}
        assert {e.request_id for e in events} == {deployments[dep_id]["request_id"]}
        assert all(e.node for e in events if e.state in ("scheduled", "running", "succeeded"))
    assert "Traceback" not in kafka.log()


def test_the_same_request_id_three_times_is_one_deployment_that_runs_once(make_system, bridges):  # noqa: F811
    system = make_system(nodes=1)
    system.add_examples("hello")
    kafka = bridges(system)
    kafka.start()
    request = {"request_id": "once", "algorithm": "hello", "args": {"who": "scheduler"}}

    # the same request twice in one batch, then once more after it has run
    kafka.send([request, request])
    dep = wait_for(lambda: system.ctl.registry.deployments.find_one({"state": "succeeded"}), 60, what="succeeded")
    kafka.send([request])
    wait_for(lambda: kafka.committed() == 3, 30, what="3 requests committed")

    assert system.ctl.registry.deployments.count_documents({}) == 1
    events = [e for _, e in kafka.read_events(lambda es: any(e.state == "succeeded" for e in es))]
    assert [e.state for e in events] == ["pending", "scheduled", "running", "succeeded"]
    assert {e.deployment_id for e in events} == {dep["_id"]}


#: bad messages, each with a piece of the reason the DLQ must give
BAD: list[tuple[bytes | None, str]] = [
    (b"\xff\xfe\x00not utf-8", "not UTF-8"),
    (b"hello scheduler", "not valid JSON"),
    (b'{"request_id": "t1", "algorithm": "hello"', "not valid JSON"),
    (b'["hello"]', "must be a JSON object, got list"),
    (b'"hello"', "must be a JSON object, got str"),
    (b"42", "must be a JSON object, got int"),
    (b"null", "must be a JSON object, got NoneType"),
    (b"", "empty"),
    (None, "empty"),
    (b'{"algorithm": "hello"}', "no 'request_id'"),
    (b'{"request_id": "b1"}', "missing the field 'algorithm'"),
    (b'{"request_id": 7, "algorithm": "hello"}', "'request_id' must be a non-empty string"),
    (b'{"request_id": "", "algorithm": "hello"}', "'request_id' must be a non-empty string"),
    (b'{"request_id": "b2", "algorithm": ["hello"]}', "'algorithm' has the wrong type"),
    (b'{"request_id": "b3", "algorithm": "  "}', "'algorithm' is empty"),
    (b'{"request_id": "b4", "algorithm": "hello", "version": 1}', "'version' must be a string"),
    (b'{"request_id": "b5", "algorithm": "hello", "args": [1]}', "'args' must be a JSON object"),
    (b'{"request_id": "b6", "algorithm": "no-such"}', "unknown algorithm 'no-such'"),
    (b'{"request_id": "b7", "algorithm": "hello", "version": "9.9"}', "unknown algorithm 'hello version 9.9'"),
    (b'{"request_id": "b8", "algorithm": "fail", "args": {"bogus": 1}}', "unknown arg(s) bogus"),
    (b'{"request_id": "b9", "algorithm": "hello", "args": {"x": NaN}}', "NaN is not valid JSON"),
    (b'{"request_id": "b10", "request_id": "b11", "algorithm": "hello"}', "duplicate key 'request_id'"),
    (json.dumps({"request_id": "x" * 300, "algorithm": "hello"}).encode(), "over the limit of 256"),
    (json.dumps({"request_id": "big", "algorithm": "hello", "args": {"pad": "x" * 5000}}).encode(), "over the limit"),
    (b"[" * 5000 + b"]" * 5000, "over the limit"),
    (b'{"request_id": "b12", "algorithm": "hello", "args": ' + b"[" * 2000 + b"]" * 2000 + b"}", "not valid JSON"),
]


def test_bad_messages_go_to_the_dlq_with_their_reason_and_the_good_ones_are_deployed(make_system, bridges):  # noqa: F811
    # Given a bridge with a 4 KiB limit, and bad messages interleaved with good ones
    system = make_system(nodes=1)
    system.add_examples("hello", "fail")
    kafka = bridges(system, max_message_bytes=4096)
    kafka.start()
    good = [{"request_id": f"good-{i}", "algorithm": "hello", "args": {"n": i}} for i in range(len(BAD))]
    messages = [m for pair in zip(good, [raw for raw, _ in BAD], strict=True) for m in pair]

    # When they are sent on one partition, so the bridge meets them in this order
    sent = [
        kafka.producer.send(kafka.requests, key=b"m%d" % i, value=kafka.encode(m), partition=0)
        for i, m in enumerate(messages)
    ]
    kafka.producer.flush()
    offsets = [f.get(timeout=10).offset for f in sent]

    # Then every bad one is in the DLQ with its bytes, where it was, and why; every good one succeeds
    letters = {d.offset: d for d in kafka.read_dead_letters(len(BAD))}
    assert len(letters) == len(BAD)
    for i, (raw, reason) in enumerate(BAD):
        letter = letters[offsets[2 * i + 1]]
        assert (letter.topic, letter.partition) == (kafka.requests, 0)
        assert (letter.key, letter.value) == (b"m%d" % (2 * i + 1), raw)
        assert reason in letter.reason, f"message {i}: {letter.reason!r} does not say {reason!r}"
    system.wait_all_succeeded(len(good), 60)
    wait_for(lambda: kafka.committed() == len(messages), 30, what="all committed")


def test_the_deploy_tasks_the_bridge_queues_are_the_ones_celery_send_task_queues(make_system):
    # the bridge builds its messages itself, for speed: they must stay what Celery sends
    system = make_system(nodes=0, control=False, beat=False)
    from dm.app import app

    doc = {"_id": "dep-1", "algorithm": "hello"}
    app.send_task(DEPLOY_TASK, kwargs=DeployTasks.kwargs(doc), queue=c.CONTROL_QUEUE, task_id="t-1", ignore_result=True)
    theirs = json.loads(system.ctl.redis.rpop(c.CONTROL_QUEUE))
    DeployTasks(app).send([doc])
    ours = json.loads(system.ctl.redis.rpop(c.CONTROL_QUEUE))
    for message in (theirs, ours):
        message["properties"].pop("delivery_tag")
        message["headers"].update(id="t-1", root_id="t-1")
        message["properties"]["correlation_id"] = "t-1"
    assert ours == theirs
