"""The bridge through failures: kill -9 mid-stream, a bridge of two dying, the broker away and back.

No control worker runs here: what must hold is that every request is recorded once and
its ``dm.deploy`` task is queued, so these tests read the registry and the Redis queue.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import psutil

from dm import constants as c
from dm.embedded import free_port, start_kafka, start_redis
from dm.relay import Relay
from tests.system import System, wait_for
from tests.test_bridge_support import bridges  # noqa: F401  (fixture)


def requests(start: int, stop: int) -> list[dict[str, object]]:
    return [{"request_id": f"req-{i}", "algorithm": "hello", "args": {"n": i}} for i in range(start, stop)]


def queued_deployments(system: System) -> list[str]:
    """The deployment ids of the ``dm.deploy`` tasks waiting in the control queue."""
    ids = []
    for raw in system.ctl.redis.lrange(c.CONTROL_QUEUE, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(kwargs["deployment_id"])
    return ids


def assert_each_recorded_once(system: System, count: int) -> None:
    registry = system.ctl.registry
    docs = list(registry.deployments.find({}, {"request_id": 1, "history": 1}))
    assert sorted(d["request_id"] for d in docs) == sorted(f"req-{i}" for i in range(count))
    assert all([e["state"] for e in d["history"]] == ["pending"] for d in docs), "each carries its pending event"
    # no control worker runs here: a relay of our own copies the events, as a control worker's would
    relay = Relay(system.ctl)
    relay.start()
    try:
        wait_for(lambda: registry.events.count_documents({}) >= count, 60, what="the relay to copy the events")
    finally:
        relay.stop.set()
        relay.join(10)
    firsts = [e["deployment_id"] for e in registry.events.find({"rev": 0}, {"deployment_id": 1})]
    assert sorted(firsts) == sorted(d["_id"] for d in docs), "each deployment has exactly one pending event"
    assert set(queued_deployments(system)) == {d["_id"] for d in docs}, "each deployment's deploy task is queued"


def test_kill_9_in_the_middle_of_1000_requests_loses_and_doubles_none(make_system, bridges):  # noqa: F811
    # Given 1,000 requests waiting, and a bridge committing every 50
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    kafka = bridges(system, batch_size=50)
    kafka.send(requests(0, 1000))
    count = system.ctl.registry.deployments.count_documents

    # When the bridge is killed with SIGKILL part-way, then started again
    kafka.start()
    wait_for(lambda: count({}) >= 150, 60, interval=0.01, what="150 deployments")
    kafka.kill("bridge")
    done_before = count({})
    assert done_before < 1000, "the bridge finished before the kill; the test proves nothing"
    kafka.start("bridge2")

    # Then exactly 1,000 deployments, each with one pending event and its deploy task queued
    wait_for(lambda: kafka.committed() == 1000, 90, interval=0.2, what="1000 requests committed")
    assert_each_recorded_once(system, 1000)
    published = kafka.read_events(lambda es: len({e.deployment_id for e in es}) == 1000)
    assert {e.rev for _, e in published} == {0}


def test_two_bridges_share_the_partitions_and_one_takes_over_when_the_other_dies(make_system, bridges):  # noqa: F811
    # Given two bridges in one group, each with some of the partitions
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    kafka = bridges(system)
    kafka.start("a")
    kafka.wait_assigned("a")
    kafka.start("b")
    kafka.wait_assigned("b")
    wait_for(lambda: all(_owned(kafka.log(n), kafka.requests) in (1, 2, 3) for n in "ab"), 30, what="a split")
    kafka.send(requests(0, 300))
    wait_for(lambda: kafka.committed() == 300, 60, what="300 committed")
    assert "to the DLQ:" not in kafka.log("a") + kafka.log("b")

    # When the one holding the events lease (only one does) is killed, and more requests come
    holders = [n for n in "ab" if "holds the lease" in kafka.log(n)]
    assert len(holders) == 1, holders
    holder, other = holders[0], "ba"["ab".index(holders[0])]
    kafka.kill(holder)
    kafka.send(requests(300, 600))

    # Then the other gets every partition, and all 600 are recorded once and their events published
    wait_for(lambda: kafka.committed() == 600, 60, what="600 committed")
    assert _owned(kafka.log(other), kafka.requests) == 4
    assert_each_recorded_once(system, 600)
    kafka.wait_log("holds the lease", other)
    kafka.read_events(lambda es: len({e.deployment_id for e in es}) == 600)


def _owned(log: str, topic: str) -> int:
    """How many partitions the last assignment in a bridge log gave it."""
    lines = [line for line in log.splitlines() if "partitions assigned:" in line]
    return lines[-1].count(f"{topic}[") if lines else -1


def test_a_broker_down_at_start_or_going_away_is_waited_for_with_backoff(make_system, bridges, tmp_path: Path):  # noqa: F811
    # Given a bridge pointed at a broker that is not running yet
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    port = free_port()
    kafka = bridges(system, bootstrap=f"127.0.0.1:{port}", kafka_timeout=1, probe_seconds=1)
    proc = kafka.start()

    # Then it says so, again and again, further apart, without spinning or exiting
    kafka.wait_log("requests: Kafka at", count=3, timeout=30)
    assert proc.poll() is None
    assert psutil.Process(proc.pid).cpu_percent(interval=1.0) < 30
    lines = [line for line in kafka.log().splitlines() if "requests: Kafka" in line and "retrying in" in line]
    delays = [float(line.rsplit(" ", 1)[-1].rstrip("s")) for line in lines]
    assert delays[:3] == sorted(delays[:3]) and delays[0] < delays[2]

    # When the broker starts, the bridge creates its topics and takes requests
    broker = start_kafka(tmp_path / "kafka", port=port)
    try:
        kafka.wait_log("created topic(s)", timeout=30)
        kafka.wait_assigned()
        kafka.send(requests(0, 1))
        wait_for(lambda: kafka.committed() == 1, 30, what="the first request committed")

        # When the broker goes away (Tansu forgets everything) and comes back
        broker.stop()
        kafka.wait_log("lost Kafka", timeout=30)
        time.sleep(1)
        broker = start_kafka(tmp_path / "kafka", port=port)
        kafka.wait_log("created topic(s)", count=2, timeout=60)
        kafka.wait_log(f"partitions assigned: {kafka.requests}[", count=2, timeout=30)
        kafka.forget_producer()
        kafka.send(requests(1, 2))
        wait_for(lambda: system.ctl.registry.deployments.count_documents({}) == 2, 30, what="the second request")
    finally:
        broker.stop()
    assert proc.poll() is None
    assert "Traceback" not in kafka.log()


def test_an_outage_of_redis_holds_the_batch_uncommitted_and_sends_nothing_to_the_dlq(stack, bridges, tmp_path: Path):  # noqa: F811
    # Given a system on a Redis of its own, and a bridge on it
    port = free_port()
    server = start_redis(tmp_path / "redis", port=port)
    system = System(server.url, stack.mongo_url, tmp_path / "home").start(nodes=0, control=False, beat=False)
    kafka = bridges(system)
    try:
        system.add_examples("hello")
        kafka.start()
        kafka.wait_assigned()

        # When Redis goes away and requests come
        server.stop()
        kafka.send(requests(0, 5))

        # Then the bridge retries them with backoff: nothing committed, nothing dead-lettered
        kafka.wait_log("requests: MongoDB or Redis is unavailable", count=2, timeout=30)
        assert kafka.committed() == 0
        assert "to the DLQ:" not in kafka.log()

        # When Redis is back, every request is recorded once and its task queued, then committed
        server = start_redis(tmp_path / "redis", port=port)
        wait_for(lambda: kafka.committed() == 5, 30, what="5 requests committed")
        kafka.wait_log("requests: MongoDB and Redis answer again")
        assert_each_recorded_once(system, 5)

        # When it is stopped in the middle of an outage, it stops at once, committing nothing
        server.stop()
        kafka.send(requests(5, 6))
        kafka.wait_log("requests: MongoDB or Redis is unavailable", count=3, timeout=30)
        proc = kafka.procs["bridge"]
        proc.terminate()
        assert proc.wait(15) == 0
        assert kafka.committed() == 5
        assert "bridge: stopped" in kafka.log() and "Traceback" not in kafka.log()
    finally:
        kafka.stop()
        system.stop()
        server.stop()
