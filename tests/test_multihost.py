"""Several hosts: nodes on test hosts (network namespaces) with their own addresses, a
network partition, Redis and MongoDB restarted under a running system, and the
``command`` provider starting and stopping nodes through its templates.

The control worker, beat and the servers run on this machine; each test host reaches
them across its own link. Everything a test makes is removed after it by PID and name.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dm import node_manager
from dm.embedded import stop_pid
from dm.errors import ConfigError
from dm.providers.command import render
from tests.ledger import instances, overlaps
from tests.netns import TEST_RANGE, BoundServers, TestHost, TestNet, bound_servers, needs_root, node_argv, testnet
from tests.system import ROOT, System, alive, wait_for
from tests.test_heartbeat import variant
from workers.agent import bounded

__all__ = ["bound_servers", "testnet"]  # fixtures, used by name

#: a short lease keeps the failover tests quick
LEASE = 3.0
#: seconds a cut-off host stays cut off: longer than its MongoDB calls wait on a silent link
PARTITION = 12.0


class Cluster:
    """A dm system (control worker and beat here) whose nodes run on test hosts."""

    def __init__(self, net: TestNet, servers: BoundServers, home: Path, **settings: Any) -> None:
        self.net = net
        self.servers = servers
        # hosts share no DM_HOME, so no signing.key file: the key goes in the environment, as in production
        key = "multihost-test-signing-key"
        self.system = System(servers.redis_url, servers.mongo_url, home, lease_ttl=LEASE, signing_key=key, **settings)
        self.agents: list[subprocess.Popen[bytes]] = []

    def start_node(self, host: TestHost, *args: str) -> subprocess.Popen[bytes]:
        """``dm node`` by hand on a test host, with a home of that host's own."""
        env = dict(self.system.env, DM_HOME=str(self.system.home / host.name))
        log = self.system.logs / f"node-{host.name}-{len(self.agents)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                node_argv(host, "--loglevel", "WARNING", *args), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.agents.append(proc)
        return proc

    def node_at(self, host: TestHost) -> dict[str, Any]:
        """The newest node that registered from this host's address."""
        nodes = [n for n in self.system.ctl.registry.list_nodes() if n.get("address") == host.address]
        return max(nodes, key=lambda n: n["created_at"])

    def host_of(self, node_id: str) -> TestHost:
        node = self.system.ctl.registry.get_node(node_id) or {}
        return next(h for h in self.net.hosts if h.address == node.get("address"))

    def node_state(self, node_id: str) -> str:
        return str((self.system.ctl.registry.get_node(node_id) or {}).get("state"))

    def stop(self) -> None:
        for proc in self.agents:
            stop_pid(proc.pid, 10)
        try:
            self.system.stop()
        except Exception:  # a store left down by a failed test: the namespaces' removal stops the rest
            for proc in self.system.procs.values():
                stop_pid(proc.pid, 10)


@pytest.fixture
def cluster(testnet: TestNet, bound_servers: BoundServers, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``cluster(**settings)``: servers reachable from three test hosts, a control worker and beat."""
    made: list[Cluster] = []

    def make(**settings: Any) -> Cluster:
        made.append(Cluster(testnet, bound_servers, tmp_path / "home", **settings))
        made[-1].system.start(nodes=0)
        return made[-1]

    yield make
    for one in made:
        one.stop()


def three_nodes(c: Cluster) -> list[str]:
    for host in c.net.hosts:
        c.start_node(host)
    c.system.wait_nodes_up(3)
    return [c.node_at(host)["_id"] for host in c.net.hosts]


def sleeper(tmp_path: Path) -> Path:
    """An algorithm that exits 0 after ``after`` seconds and is never restarted."""
    target = tmp_path / "sleeper"
    target.mkdir()
    (target / "algorithm.toml").write_text(
        'name = "sleeper"\nversion = "1.0.0"\ncommand = ["python", "main.py"]\ncpu = 0.05\nmemory = 16\n'
        'args = ["after"]\n\n[restart]\npolicy = "never"\n'
    )
    (target / "main.py").write_text(
        "import json, os, time\ntime.sleep(float(json.loads(os.environ['DM_ARGS'])['after']))\n"
    )
    return target


@needs_root
def test_nodes_on_three_hosts_report_their_own_addresses_and_share_the_deployments(cluster, tmp_path):
    # Given a node started by hand on each of three test hosts (provider static)
    c = cluster(provider="static")
    nodes = three_nodes(c)
    c.system.add_examples("service")

    # When six services are deployed
    deps = [c.system.deploy("service", args={"interval": 0.5}) for _ in range(6)]
    docs = [c.system.wait_state(d["id"], "running") for d in deps]

    # Then every host runs some, each algorithm inside its node's host
    assert set(Counter(d["node"] for d in docs)) == set(nodes)
    for d in docs:
        assert d["pid"] in c.net.pids(c.host_of(d["node"]))
    # and `dm nodes --json` shows each node at its own address in the test range
    rows = json.loads(c.system.dm("nodes", "--json").stdout)
    assert sorted(r["address"] for r in rows) == sorted(h.address for h in c.net.hosts)
    assert all(ipaddress.ip_address(r["address"]) in TEST_RANGE for r in rows)
    assert {r["state"] for r in rows} == {"up"}

    # When an algorithm that fits no node is deployed: the static provider starts nothing
    c.system.add_algorithm(variant(tmp_path, "service", "big", cpu="2"))
    big = c.system.deploy("big", args={"interval": 0.5})
    assert big["state"] == "pending" and "waiting for room" in big["reason"]
    time.sleep(2 * LEASE)
    assert c.system.deployment(big["id"])["state"] == "pending"
    assert len(c.system.ctl.registry.list_nodes()) == 3

    # When someone starts a bigger node by hand on the third host
    c.start_node(c.net.hosts[2], "--cpus", "4", "--memory", "2048")
    bigger = wait_for(lambda: c.system.wait_nodes_up(4) and c.node_at(c.net.hosts[2]), 30, what="the fourth node")

    # Then the waiting deployment runs there
    assert c.system.wait_state(big["id"], "running")["node"] == bigger["_id"]
    assert bigger["cpus"] == 4 and bigger["provider"] == "static"

    # And a node that owns its host reports the host's capacity
    c.start_node(c.net.hosts[1], "--host-wide")
    wait_for(lambda: c.node_at(c.net.hosts[1])["_id"] not in nodes, 30, what="the host-wide node")
    owner = c.node_at(c.net.hosts[1])
    assert owner["host_wide"] and owner["cpus"] == os.cpu_count()
    assert owner["memory"] == pytest.approx(psutil.virtual_memory().total / 2**20, rel=0.01)


@needs_root
def test_a_host_cut_off_fences_itself_its_work_moves_and_it_rejoins_running_nothing_twice(cluster, tmp_path):
    # Given six services with a ledger on nodes on three test hosts
    c = cluster(provider="static")
    three_nodes(c)
    c.system.add_examples("service")
    ledger = tmp_path / "ledger"
    deps = [c.system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(6)]
    docs = [c.system.wait_state(d["id"], "running") for d in deps]
    victim = docs[0]["node"]
    host = c.host_of(victim)
    cut_off = [d for d in docs if d["node"] == victim]

    # When that host's link is cut while its algorithms run
    cut_at = time.monotonic()
    c.net.cut(host)
    try:
        # Then the cut-off node kills its own copies before its lease runs out
        wait_for(lambda: not any(alive(d["pid"]) for d in cut_off), 2 * LEASE, 0.05, what="the copies to die")
        assert time.monotonic() - cut_at <= LEASE
        # and once its lease expires (one heartbeat and a start later) they run on the other hosts
        for d in cut_off:
            wait_for(
                lambda d=d: (x := c.system.deployment(d["_id"]))["state"] == "running" and x["node"] != victim,
                LEASE + 10, what="the deployment running on another host",
            )  # fmt: skip
        assert time.monotonic() - cut_at <= LEASE + 3
        assert c.node_state(victim) == "dead"
        time.sleep(max(0.0, PARTITION - (time.monotonic() - cut_at)))
    finally:
        c.net.heal(host)

    # When the link is back, the node rejoins empty
    wait_for(lambda: c.node_state(victim) == "up", 30, what="the node to rejoin")
    assert not [d for d in c.system.ctl.registry.list_deployments(["running"]) if d["node"] == victim]
    # and takes new work again
    more = [c.system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(3)]
    more_docs = [c.system.wait_state(d["id"], "running") for d in more]
    assert victim in {d["node"] for d in more_docs}, "the rejoined node got none of three new deployments"

    # And no deployment was ever alive twice at once
    time.sleep(1)
    assert overlaps(ledger) == []
    assert all(c.system.deployment(d["id"])["state"] == "running" for d in deps + more)
    assert len(instances(ledger)) == 9


def held_service(tmp_path: Path, keep_for: str) -> Path:
    """The example service, declaring in its algorithm.toml that a cut-off node keeps it ``keep_for``."""
    target = tmp_path / "held-service"
    shutil.copytree(ROOT / "examples" / "algorithms" / "service", target)
    toml = target / "algorithm.toml"
    toml.write_text(toml.read_text().replace('name = "service"', 'name = "held-service"')
                    + f'\n[disconnect]\nkeep_for = "{keep_for}"\n')  # fmt: skip
    return target


@needs_root
def test_a_host_cut_off_kills_its_copies_first_and_keeps_one_declaring_keep_for_until_it_ends(cluster, tmp_path):
    # Given, on a node of the first test host, a service and one whose algorithm.toml says
    # `[disconnect] keep_for = "30s"`, and nodes on the two other hosts
    c = cluster(provider="static")
    c.system.add_examples("service")
    c.system.add_algorithm(held_service(tmp_path, "30s"))
    c.start_node(c.net.hosts[0])
    c.system.wait_nodes_up(1)
    victim = c.node_at(c.net.hosts[0])["_id"]
    ledger = tmp_path / "ledger"
    args = {"interval": 0.1, "ledger": str(ledger)}
    plain = c.system.wait_state(c.system.deploy("service", args=args)["id"], "running")
    held = c.system.wait_state(c.system.deploy("held-service", args=args)["id"], "running")
    assert plain["node"] == held["node"] == victim
    for host in c.net.hosts[1:]:
        c.start_node(host)
    c.system.wait_nodes_up(3)

    # When that host's link goes down
    host = c.net.hosts[0]
    c.net.cut(host)
    cut_at = time.time()
    try:
        # Then the plain one's copy dies there first (the node fences itself within the lease)
        wait_for(lambda: not alive(plain["pid"]), LEASE, 0.05, what="the plain copy to die on the cut-off node")
        # and it runs on another host within the lease plus 2 s
        moved = wait_for(lambda: (d := c.system.deployment(plain["id"]))["state"] == "running"
                         and d["node"] != victim and d, LEASE + 7, 0.05, what="the plain one elsewhere")  # fmt: skip
        moved_after = time.time() - cut_at
        assert moved["generation"] > plain["generation"]
        # while the held one runs on, recorded on the cut-off node, for most of its 30 s
        wait_for(lambda: time.time() > cut_at + 25, 30, interval=0.5, what="25 s into the cut")
        still = c.system.deployment(held["id"])
        assert (still["node"], still["generation"], still["state"]) == (victim, held["generation"], "running")
        assert alive(held["pid"])
        assert max(i.last_seen for i in instances(ledger)[held["id"]]) > cut_at + 24  # it ticked on there
        # and moves only after its keep_for, once its copy there is dead
        later = wait_for(lambda: (d := c.system.deployment(held["id"]))["state"] == "running"
                         and d["node"] != victim and d, 30, 0.1, what="the held one elsewhere")  # fmt: skip
        assert time.time() > cut_at + 30 and later["generation"] > held["generation"]
        assert not alive(held["pid"])
    finally:
        c.net.heal(host)

    # When the link is back the node rejoins, running neither of them
    wait_for(lambda: c.node_state(victim) == "up", 30, what="the node to rejoin")
    assert not [d for d in c.system.ctl.registry.list_deployments(["running"]) if d["node"] == victim]
    # And no copy of either ever ran beside another (the ledger: two runs each, one after the other)
    wait_for(lambda: all(len(instances(ledger)[d]) == 2 for d in (plain["id"], held["id"])), 10, what="ledger")
    assert overlaps(ledger) == []
    assert moved_after <= LEASE + 2, f"the plain one ran elsewhere {moved_after:.2f}s after the cut"


@needs_root
def test_redis_and_mongodb_restarted_under_a_running_system_lose_nothing(cluster, bound_servers, tmp_path):
    # Given services with a ledger on three test hosts
    c = cluster(provider="static")
    nodes = three_nodes(c)
    c.system.add_examples("service", "hello")
    c.system.add_algorithm(sleeper(tmp_path))
    ledger = tmp_path / "ledger"
    services = [c.system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(3)]
    for d in services:
        c.system.wait_state(d["id"], "running")
    short = c.system.deploy("sleeper", args={"after": 3})
    c.system.wait_state(short["id"], "running")
    crashed = c.system.wait_state(services[0]["id"], "running")

    # When MongoDB goes away for a while (longer than a client's server selection) and comes back
    bound_servers.stop_mongo()
    from dm import deploy

    during = deploy.delay("hello")  # the control worker keeps the request until MongoDB answers
    os.kill(crashed["pid"], signal.SIGKILL)  # a crash its node must report while MongoDB is away
    time.sleep(7)  # meanwhile the sleeper exits: its node keeps that report too
    bound_servers.start_mongo()

    # Then what happened meanwhile is all recorded, and the request made meanwhile is served
    assert c.system.wait_state(short["id"], "succeeded", "failed", timeout=30)["state"] == "succeeded"
    restarted = c.system.wait_state(crashed["_id"], "running", timeout=30)
    wait_for(lambda: c.system.deployment(crashed["_id"])["restarts"] == 1, 30, what="the crash restarted")
    assert restarted["generation"] == crashed["generation"] and restarted["node"] == crashed["node"]
    hello = during.get(timeout=60)
    assert c.system.wait_state(hello["id"], "succeeded", "failed")["state"] == "succeeded"
    assert all(c.node_state(n) == "up" for n in nodes)

    # When Redis goes away for longer than the lease and comes back (append-only file, same port)
    bound_servers.stop_redis()
    time.sleep(LEASE + 2)
    bound_servers.start_redis()

    # Then every node comes back on its own, and every service runs again
    wait_for(lambda: all(c.node_state(n) == "up" for n in nodes), 60, what="every node up again")
    for d in services:
        c.system.wait_state(d["id"], "running", timeout=60)
    # and the control plane serves requests: a deploy and a stop
    assert c.system.wait_state(c.system.deploy("hello")["id"], "succeeded")["state"] == "succeeded"
    c.system.dm("stop", services[1]["id"])
    assert c.system.wait_state(services[1]["id"], "stopped")["state"] == "stopped"

    # And nothing ended in the wrong state, and no deployment ran twice at once
    assert c.system.deployment(short["id"])["state"] == "succeeded"
    assert c.system.deployment(hello["id"])["state"] == "succeeded"
    assert {c.system.deployment(d["id"])["state"] for d in (services[0], services[2])} == {"running"}
    time.sleep(1)
    assert overlaps(ledger) == []

    # And the relay went on through both outages: every transition of every deployment is in events
    registry = c.system.ctl.registry

    def relayed() -> bool:
        for doc in registry.deployments.find({}, {"rev": 1}):
            revs = sorted(e["rev"] for e in registry.events.find({"deployment_id": doc["_id"]}, {"rev": 1}))
            if revs != list(range(doc["rev"] + 1)):
                return False
        return True

    wait_for(relayed, 30, what="every event copied into events")


@needs_root
def test_the_command_provider_starts_and_stops_nodes_on_test_hosts_through_its_templates(cluster, testnet, tmp_path):
    # Given the command provider with templates that run a node inside a test host
    start = (
        f"ip netns exec {{host}} {sys.executable} -m workers --id {{node_id}} --cpus {{cpus}} --memory {{memory}} "
        "--redis {redis_url} --mongo {mongo_url} --loglevel WARNING"
    )
    stop = "ip netns exec {host} kill -TERM {pid}"
    c = cluster(
        provider="command", node_start_command=start, node_stop_command=stop, max_nodes=2, min_nodes=0,
        idle_timeout=3600, node_hosts=",".join(h.name for h in testnet.hosts[:2]),
    )  # fmt: skip
    c.system.add_examples("service")
    c.system.add_algorithm(variant(tmp_path, "service", "big", cpu="0.75"))

    # When a deployment finds no node, then another finds the first one full
    first = c.system.wait_state(c.system.deploy("service", args={"interval": 0.5})["id"], "running", timeout=60)
    second = c.system.wait_state(c.system.deploy("big", args={"interval": 0.5})["id"], "running", timeout=60)

    # Then each ran on a node the template started on its own test host
    a, b = (c.system.ctl.registry.get_node(d["node"]) for d in (first, second))
    assert a and b and a["_id"] != b["_id"]
    for node, host in zip((a, b), c.net.hosts[:2], strict=True):
        assert (node["provider"], node["provider_host"], node["address"]) == ("command", host.name, host.address)
        assert node["pid"] in c.net.pids(host)

    # When the node manager stops the second node through the stop template
    assert node_manager.stop_node(c.system.ctl, b["_id"])

    # Then it hands its deployment over and exits
    wait_for(lambda: c.node_state(b["_id"]) == "stopped", 30, what="the node to stop")
    wait_for(lambda: not alive(b["pid"]), 10, what="the agent to exit")
    moved = c.system.wait_state(second["id"], "running", "scheduled", timeout=30)
    assert moved["node"] != b["_id"]


def test_a_command_template_is_filled_in_word_by_word_and_never_through_a_shell():
    values = {"host": "gpu1; rm -rf /", "node_id": "7", "redis_url": "redis://10.0.0.5:6379/0"}

    argv = render("ssh {host} 'dm node' --id {node_id} --redis={redis_url}", values, "DM_NODE_START_COMMAND")

    assert argv == ["ssh", "gpu1; rm -rf /", "dm node", "--id", "7", "--redis=redis://10.0.0.5:6379/0"]
    with pytest.raises(ConfigError, match=r"DM_NODE_START_COMMAND.*known placeholders: \{host\} \{node_id\}"):
        render("ssh {hots} dm node", values, "DM_NODE_START_COMMAND")


def test_a_node_bounds_its_mongodb_calls_unless_the_url_says_otherwise():
    assert bounded("mongodb://10.0.0.5:27017") == "mongodb://10.0.0.5:27017/?socketTimeoutMS=10000"
    assert bounded("mongodb://a:1,b:2/dm?replicaSet=rs") == "mongodb://a:1,b:2/dm?replicaSet=rs&socketTimeoutMS=10000"
    assert bounded("mongodb://h/?socketTimeoutMS=500") == "mongodb://h/?socketTimeoutMS=500"
