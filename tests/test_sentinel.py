"""Redis HA through Sentinel: a dm system on a ``sentinel://`` URL rides through a failover.

Real servers: a Redis primary, a replica and three Sentinels (tests/servers.py
``sentinel_redis``), MongoDB from the session stack, and a whole dm system on the
Sentinel URL: control worker, beat, nodes and this process as the client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dm import fleet
from dm import keys as k
from dm.embedded import _running
from tests.ledger import overlaps
from tests.servers import SentinelTopology, StackInfo
from tests.system import ROOT, System, alive, forget_connections, wait_for

#: the lease of the test system. A promotion takes about 2.3 s here (the embedded Sentinels
#: call a primary down after 1 s, then elect and promote); a node kills its algorithms when it
#: could not renew for 3/4 of the lease, so the lease must leave the renewal time to spare
#: (dm's default of 3 s does not: see docs/operations.md, "Redis high availability")
LEASE = 8.0
#: services that must ride through the failover untouched
SERVICES = 4


def deploy_until_accepted(system: System, request_id: str) -> dict[str, Any]:
    """What a scheduler does: send the request, and on an error or no answer send it again
    with the same request id (at-least-once; the request id makes a repeat harmless)."""
    while True:
        try:
            return system.deploy("hello", timeout=5, request_id=request_id, args={"who": request_id})
        except Exception:
            time.sleep(0.2)


class Scheduler(threading.Thread):
    """Sends a new request every `period` until stopped; each one until it is accepted."""

    def __init__(self, system: System, period: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.system, self.period = system, period
        self.sent: list[str] = []
        self.accepted: dict[str, float] = {}
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                request_id = f"req-{len(self.sent)}-{uuid.uuid4().hex[:6]}"
                self.sent.append(request_id)
                deploy_until_accepted(self.system, request_id)
                self.accepted[request_id] = time.monotonic()
                self.stopping.wait(self.period)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


@pytest.fixture
def sentinel_system(sentinel_redis: SentinelTopology, stack: StackInfo, tmp_path: Path):
    systems: list[System] = []

    def make(nodes: int = 2, **settings: Any) -> System:
        system = System(sentinel_redis.url, stack.mongo_url, tmp_path / f"home{len(systems)}", **settings)
        systems.append(system)
        return system.start(nodes=nodes)

    yield make
    for system in systems:
        system.stop()
    forget_connections()  # the next test's servers are elsewhere


def test_a_system_on_a_sentinel_url_deploys_and_runs(sentinel_system, sentinel_redis: SentinelTopology) -> None:
    system = sentinel_system(nodes=1)
    system.add_examples("hello")
    dep = system.deploy("hello", args={"who": "sentinel"})
    assert system.wait_state(dep["id"], "succeeded", timeout=60)["node"] == dep["node"]
    # the fleet state is on the master the Sentinels name
    master = sentinel_redis.master()
    assert master is not None and system.ctl.redis.info("server")["tcp_port"] == master.port


@pytest.mark.slow
def test_kill_9_of_the_primary_kills_nothing_loses_no_deploy(
    sentinel_system, sentinel_redis: SentinelTopology, tmp_path: Path
) -> None:
    # Given: services running on two nodes, and a scheduler sending deploys all along
    system = sentinel_system(nodes=2, lease_ttl=LEASE, start_timeout=15)
    system.add_examples("hello", "service")
    ledger = tmp_path / "ledger"
    deps = [system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(SERVICES)]
    before = {d["id"]: system.wait_state(d["id"], "running", timeout=60) for d in deps}
    assert len({d["node"] for d in before.values()}) == 2, "the services should spread over both nodes"
    scheduler = Scheduler(system)
    scheduler.start()
    wait_for(lambda: len(scheduler.accepted) >= 3, 30, what="the scheduler's first deploys")
    primary = sentinel_redis.master()
    assert primary is not None and primary.name == "redis"
    run_before = system.ctl.redis.info("server")["run_id"]

    # When: the primary is killed with SIGKILL
    os.kill(primary.pid, signal.SIGKILL)
    killed = time.monotonic()

    # Then: the Sentinels promote the replica
    promoted = wait_for(lambda: (m := sentinel_redis.master()) is not None and m.name == "redis-replica" and m, 30,
                        interval=0.05, what="the replica promoted")  # fmt: skip
    promoted_at = time.monotonic()
    # and deploys work again within 10 s of it: a request is accepted (one thread sends them
    # all: Celery's result consumer is not for concurrent callers)
    wait_for(lambda: any(t > promoted_at for t in scheduler.accepted.values()),
             max(0.5, 10 - (time.monotonic() - promoted_at)), what="a deploy accepted after the promotion")  # fmt: skip
    worked_after = min(t for t in scheduler.accepted.values() if t > promoted_at) - promoted_at
    # and everyone now talks to the new master, a new run: each node's presence connection
    # is there, and it has published a sample (renewing its lease) since the promotion
    assert system.ctl.redis.info("server")["tcp_port"] == promoted.port
    assert system.ctl.redis.info("server")["run_id"] != run_before
    nodes = sorted({d["node"] for d in before.values()})
    promoted_wall = time.time() - (time.monotonic() - promoted_at)
    wait_for(lambda: set(nodes) <= (fleet.present_nodes(system.ctl.redis) or set()), 15, what="nodes present")
    wait_for(lambda: all(float(system.ctl.redis.hget(k.NODE.format(n), "ts") or 0) > promoted_wall for n in nodes),
             15, what="every node publishing to the new master")  # fmt: skip
    # past the grace a new run gives (one lease), with detector passes after it
    detector = lambda: system.ctl.redis.hgetall(k.DETECTOR)  # noqa: E731
    wait_for(lambda: float(detector().get("seen") or 0) > float(detector().get("blind_until") or 1e18) + 1, 30,
             what="detector passes after the grace of the new Redis run")  # fmt: skip
    scheduler.stopping.set()
    scheduler.join(60)
    assert not scheduler.errors and not scheduler.is_alive()

    # nothing running was killed: same pid, same generation, still running, no second copy
    for dep_id, was in before.items():
        now = system.deployment(dep_id)
        assert (now["state"], now["node"], now["pid"], now["generation"]) == (
            "running", was["node"], was["pid"], was["generation"]
        ), f"{dep_id} was disturbed by the failover"  # fmt: skip
        assert alive(now["pid"])
    assert overlaps(ledger) == []
    assert all(n["state"] == "up" for n in system.ctl.registry.list_nodes())
    # no deploy was lost: each request ends in exactly one deployment, which ran
    requests = scheduler.sent
    assert len(scheduler.sent) >= 6, "the scheduler should have sent deploys before and after the kill"
    for request_id in requests:
        docs = list(system.ctl.registry.deployments.find({"request_id": request_id}))
        assert len(docs) == 1, f"request {request_id} made {len(docs)} deployments"
    wait_for(lambda: all(d["state"] == "succeeded" for d in system.ctl.registry.deployments.find(
             {"request_id": {"$in": requests}})), 45, what="every request's deployment to run")  # fmt: skip
    print(f"promoted {promoted_at - killed:.2f}s after the kill; deploys worked {worked_after:.2f}s after it")


def test_dm_up_sentinel_runs_on_the_sentinels_and_dm_down_stops_them(tmp_path: Path) -> None:
    # Given: a fresh DM_HOME, no server URLs, and `dm up --sentinel`
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
    env["DM_HOME"] = str(tmp_path / "dm-home")

    def dm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dm", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)  # fmt: skip

    up = dm("up", "--sentinel", "--detach", "--no-bridge", "--no-flower", "--no-metrics")
    state_file = tmp_path / "dm-home" / "stack.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"processes": {}, "servers": {}}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        # Then: Redis is a primary, a replica and three Sentinels, and dm uses the Sentinels' URL
        assert set(state["servers"]) >= {"redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
        assert state["redis_url"].startswith("sentinel://") and state["redis_url"].endswith("/dm/0")
        # and a deploy goes through them
        assert dm("algorithms", "add", str(ROOT / "examples" / "algorithms" / "hello")).returncode == 0
        deployed = dm("deploy", "hello", "--arg", "who=ha", "--wait", "--json")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert json.loads(deployed.stdout)["state"] == "succeeded"
    finally:
        down = dm("down")
    assert down.returncode == 0, down.stderr
    pids = [*state["processes"].values(), *state["servers"].values()]
    assert pids and not [pid for pid in pids if _running(pid)]
