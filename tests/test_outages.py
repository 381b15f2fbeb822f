"""The fleet rides through control-store outages: a Redis stall, and Redis replaced by an
empty server on the same address, kill nothing and run nothing twice."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dm import keys as k
from dm.embedded import Server, start_mongo, start_redis
from tests.ledger import instances, overlaps
from tests.system import System, alive, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[list[Server]]:
    """A Redis of this test's own (the list holds the one running now), stopped by PID."""
    servers = [start_redis(tmp_path / "redis-home")]
    yield servers
    for server in servers:
        server.stop()


def fleet_with_services(
    stack, private_redis: list[Server], tmp_path: Path, count: int = 6
) -> tuple[System, Path, dict[str, dict]]:
    system = System(private_redis[0].url, stack.mongo_url, tmp_path / "home")
    system.start(nodes=3)
    system.add_examples("service", "hello")
    ledger = tmp_path / "ledger"
    deps = [system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(count)]
    running = {d["id"]: system.wait_state(d["id"], "running", timeout=60) for d in deps}
    assert len({d["node"] for d in running.values()}) >= 2
    # and the failure detector has checked this Redis once: an outage before its first
    # check is one it cannot tell from a new server's start
    detector_pass_after(system, time.time())
    return system, ledger, running


def detector_pass_after(system: System, when: float, timeout: float = 60) -> None:
    wait_for(lambda: float(system.ctl.redis.get(k.HEARTBEAT_LAST) or 0) > when, timeout,
             what="a failure-detector pass")  # fmt: skip


def assert_untouched(system: System, ledger: Path, before: dict[str, dict]) -> None:
    for dep_id, doc in before.items():
        now = system.deployment(dep_id)
        assert (now["state"], now["pid"], now["generation"], now["node"]) == (
            "running", doc["pid"], doc["generation"], doc["node"],
        ), now  # fmt: skip
        assert alive(doc["pid"])
    assert overlaps(ledger) == []
    assert all(len(runs) == 1 for runs in instances(ledger).values())


def test_redis_stalled_5s_kills_nothing(stack, private_redis, tmp_path):
    # Given six services on three nodes
    system, ledger, before = fleet_with_services(stack, private_redis, tmp_path)
    try:
        # When Redis stalls for 5 s (as a blocked fork, a slow disk or a network blip does)
        os.kill(private_redis[0].pid, signal.SIGSTOP)
        time.sleep(5)  # the stall itself
        os.kill(private_redis[0].pid, signal.SIGCONT)
        resumed = time.time()

        # Then, past a lease period of verdicts after it, every algorithm still runs: same
        # process, same generation, same node, one instance each in the ledger
        detector_pass_after(system, resumed + system.settings.lease_ttl + 1)
        assert_untouched(system, ledger, before)
        assert all(n["state"] == "up" for n in system.ctl.registry.list_nodes())
        # and `dm status` tells of the stall
        shown = json.loads(system.dm("status", "--json").stdout)["control_store"]
        assert shown["redis"] == "reachable" and shown["last_outage"]["seconds"] >= 4.5, shown
        # and so does every worker's stats, the rows Flower shows on a worker's page
        stats = wait_for(lambda: (s := worker_stats()) and len(s) == 4 and s, 30, 0.5, what="four workers' stats")
        for name, rows in stats.items():
            assert rows["dm control store"].startswith("Redis reachable; last outage"), (name, rows)
            assert "none" not in rows["dm last outage"], (name, rows)
            if name.startswith("node-"):
                assert rows["dm node lease"].startswith("renewed"), (name, rows)
                assert "lease not renewed for" in rows["dm node last outage"], (name, rows)
                assert rows["dm node in grace"] == "no", (name, rows)
    finally:
        os.kill(private_redis[0].pid, signal.SIGCONT)
        system.stop()


def worker_stats() -> dict[str, dict[str, str]]:
    """Each dm worker's rows of ``celery inspect stats`` that name the control store."""
    from dm.app import app

    replies = app.control.inspect(timeout=3).stats() or {}
    return {name: {k: v for k, v in s.items() if k.startswith("dm ")} for name, s in replies.items()}


def test_redis_restarted_in_place_kills_nothing(stack, tmp_path):
    # Given six services on three nodes, on a Redis that keeps its data (append-only file)
    redis = [start_redis(tmp_path / "redis-home", persistent=True)]
    try:
        system, ledger, before = fleet_with_services(stack, redis, tmp_path)
        try:
            # When it is restarted in place (same port, same files)
            port = redis[0].port
            redis.pop().stop()
            redis.append(start_redis(tmp_path / "redis-home", persistent=True, port=port))
            restarted = time.time()

            # Then past a lease period of verdicts nothing was killed or started twice, and deploys work
            detector_pass_after(system, restarted + system.settings.lease_ttl + 1)
            assert_untouched(system, ledger, before)
            hello = system.deploy("hello", timeout=30)
            assert system.wait_state(hello["id"], "succeeded", "failed", timeout=30)["state"] == "succeeded"
        finally:
            system.stop()
    finally:
        for server in redis:
            server.stop()


def test_redis_replaced_by_an_empty_server_kills_nothing_and_deploys_work(stack, private_redis, tmp_path):
    # Given six services on three nodes
    system, ledger, before = fleet_with_services(stack, private_redis, tmp_path)
    try:
        # When Redis is replaced by an empty server on the same address (no persistence)
        port = private_redis[0].port
        private_redis.pop().stop()
        private_redis.append(start_redis(tmp_path / "redis-home-2", port=port))
        replaced = time.time()

        # Then the nodes register again, and a new deploy works within 10 s
        wait_for(lambda: len([n for n in system.ctl.redis.smembers(k.NODES)]) == 3, 30, what="nodes registered again")
        hello = system.deploy("hello", timeout=30)
        done = system.wait_state(hello["id"], "succeeded", "failed", timeout=30)
        assert done["state"] == "succeeded"
        assert time.time() - replaced < 10, "new deploys work within 10 s of an emptied Redis"

        # and past a lease period of verdicts, nothing was killed or started twice, and the
        # allocations of what runs are back in the fleet
        detector_pass_after(system, replaced + system.settings.lease_ttl + 1)
        assert_untouched(system, ledger, before)
        for dep_id, doc in before.items():
            assert dep_id in system.ctl.redis.hkeys(k.ALLOC.format(doc["node"]))
    finally:
        system.stop()


def test_mongodb_away_30s_touches_nothing_running_and_a_deploy_made_meanwhile_is_served(stack, tmp_path):
    # Given six services on three nodes, with a MongoDB of this test's own
    mongo = start_mongo(tmp_path / "mongo-home")
    redis = [start_redis(tmp_path / "redis-home")]
    system = System(redis[0].url, mongo.url, tmp_path / "home")
    try:
        system.start(nodes=3)
        system.add_examples("service", "hello")
        ledger = tmp_path / "ledger"
        deps = [system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(6)]
        before = {d["id"]: system.wait_state(d["id"], "running", timeout=60) for d in deps}

        # When MongoDB is away for 30 s (the same data when it comes back), and a deploy arrives meanwhile
        port = mongo.port
        mongo.stop()
        from dm import deploy

        during = deploy.delay("hello")  # accepted: the task waits in Redis; recorded once MongoDB answers
        time.sleep(30)  # the outage itself
        mongo = start_mongo(tmp_path / "mongo-home", port=port)

        # Then the deploy made meanwhile is recorded and served, and nothing running was touched
        hello = during.get(timeout=120)
        assert system.wait_state(hello["id"], "succeeded", "failed", timeout=60)["state"] == "succeeded"
        detector_pass_after(system, time.time() + 1)
        assert_untouched(system, ledger, before)
    finally:
        system.stop()
        mongo.stop()
        redis[0].stop()


def test_a_frozen_node_kills_its_copies_first_and_keep_for_holds_one_there(make_system, tmp_path):
    # Given two services on a node, one asking to keep running when its node is cut off
    system = make_system(nodes=1, lease_ttl=3)
    system.add_examples("service")
    ledger = tmp_path / "ledger"
    args = {"interval": 0.1, "ledger": str(ledger)}
    plain = system.wait_state(system.deploy("service", args=args)["id"], "running")
    held = system.wait_state(system.deploy("service", args=args, keep_for=30)["id"], "running")
    victim = plain["node"]
    assert held["node"] == victim
    system.add_node()
    system.wait_nodes_up(2)
    agent = system.node_pid(victim)

    # When its agent freezes (SIGSTOP: its lease stops, its connections stay open)
    os.kill(agent, signal.SIGSTOP)
    frozen = time.time()
    try:
        # Then the plain one runs elsewhere within the lease and 2 s, its old copy gone first
        moved = wait_for(lambda: (d := system.deployment(plain["id"]))["node"] != victim and d["state"] == "running"
                         and d, system.settings.lease_ttl + 2 + 5, what="the plain one elsewhere")  # fmt: skip
        assert moved["generation"] > plain["generation"]
        # and the held one keeps running on the frozen node, recorded there, for its 30 s
        wait_for(lambda: time.time() > frozen + 20, 25, interval=0.5, what="20 s into the freeze")
        still = system.deployment(held["id"])
        assert (still["node"], still["generation"], still["state"]) == (victim, held["generation"], "running")
        assert max(i.last_seen for i in instances(ledger)[held["id"]]) > frozen + 18  # it ticked on there
        # and moves only after its keep_for
        later = wait_for(lambda: (d := system.deployment(held["id"]))["node"] != victim and d["state"] == "running"
                         and d, 30, what="the held one elsewhere")  # fmt: skip
        assert time.time() > frozen + 30 and later["generation"] > held["generation"]
    finally:
        os.kill(agent, signal.SIGCONT)
    # And no deployment ever had two copies alive at once
    wait_for(lambda: all(len(instances(ledger)[d]) == 2 for d in (plain["id"], held["id"])), 10, what="ledger")
    assert overlaps(ledger) == []
