"""Scale: hollow nodes (workers/hollow.py) are nodes like any other to the control plane, and
every query the code makes of the registry is served by an index (the registry says so).

The registry here is SecantusDB; its ``explain`` output has MongoDB's shape (a
``queryPlanner.winningPlan`` tree of stages, ``COLLSCAN`` for a collection scan), with two
differences the explain test handles: it explains an ``update``/``delete`` without its
filter (so each is explained as a ``find`` of its filter, which plans the same on MongoDB),
and it reports a filter of ``_id`` plus other fields as a ``COLLSCAN`` though it fetches
such a document by ``_id`` (so the ``_id`` part is what is explained then).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo import monitoring

from dm import deployer, fleet, reconcilers
from dm import keys as k
from dm.control import Control
from dm.models import DeployRequest, MetricsSample
from tests.system import System, wait_for
from workers import hollow

ALGORITHM = "hollowtest"


def add_algorithm(registry: Any, tmp_path: Path, policy: str = "never", name: str = ALGORITHM) -> None:
    """An algorithm a hollow node can "run" (its command is never started)."""
    from dm.package import load_spec, pack

    directory = tmp_path / name
    directory.mkdir()
    (directory / "algorithm.toml").write_text(
        f'name = "{name}"\nversion = "1.0.0"\ncommand = ["/bin/false"]\ncpu = 0.25\nmemory = 64\n'
        f'[restart]\npolicy = "{policy}"\nbackoff = 0.1\n'
    )
    archive, sha = pack(directory)
    registry.add_algorithm(load_spec(directory), archive, sha)


def start_hollow(system: System, count: int, name: str = "hollow") -> None:
    system.spawn(name, [sys.executable, "-m", "dm", "node", "--hollow", str(count), "--cpus", "4", "--memory", "4096"])


def hollow_ids(system: System) -> set[str]:
    return {n["_id"] for n in system.ctl.registry.nodes.find({"hollow": True, "state": "up"})}


def states_of(system: System, dep_id: str) -> list[str]:
    return [e["state"] for e in system.ctl.registry.list_events(dep_id, limit=1000)]


@pytest.mark.slow
def test_a_hollow_node_runs_stops_and_exits_through_the_outbox(make_system: Any, tmp_path: Path) -> None:
    # Given a control worker, beat and two hollow nodes in one process (no other nodes)
    system = make_system(nodes=0, provider="static")
    add_algorithm(system.ctl.registry, tmp_path)
    start_hollow(system, 2)
    nodes = set(system.wait_nodes_up(2))
    assert hollow_ids(system) == nodes
    listed = json.loads(system.dm("nodes", "--json").stdout)
    assert {n["id"]: n["state"] for n in listed} == dict.fromkeys(nodes, "up")

    # When a deployment is placed: it reaches running on a hollow node, with a pid of no process
    dep = system.deploy(ALGORITHM)
    running = system.wait_state(dep["id"], "running")
    assert running["node"] in nodes and running["generation"] == 1
    assert running["pid"] >= hollow.FAKE_PID_BASE
    assert states_of(system, dep["id"]) == ["pending", "scheduled", "running"]

    # When it is stopped: the node reports stopped (killed by SIGTERM) and frees its allocation
    assert system.dm("stop", dep["id"]).returncode == 0
    stopped = system.wait_state(dep["id"], "stopped")
    assert stopped["exit_code"] == -15 and stopped["generation"] == 1
    wait_for(lambda: dep["id"] not in fleet.allocations(system.ctl.redis, running["node"]), what="allocation freed")

    # When the order's args say to exit: with 0 it succeeded, with 3 it failed (policy never)
    ok = system.deploy(ALGORITHM, args={"hollow_exit_after": 0.2, "hollow_exit_code": 0})
    bad = system.deploy(ALGORITHM, args={"hollow_exit_after": 0.2, "hollow_exit_code": 3})
    assert system.wait_state(ok["id"], "succeeded")["exit_code"] == 0
    failed = system.wait_state(bad["id"], "failed")
    assert failed["exit_code"] == 3 and failed["reason"] == "exit code 3"
    assert states_of(system, bad["id"]) == ["pending", "scheduled", "running", "failed"]


@pytest.mark.slow
def test_a_hollow_node_restarts_what_exits_by_its_restart_policy(make_system: Any, tmp_path: Path) -> None:
    system = make_system(nodes=0, provider="static")
    add_algorithm(system.ctl.registry, tmp_path, policy="on-failure")
    start_hollow(system, 1)
    system.wait_nodes_up(1)
    dep = system.deploy(ALGORITHM, args={"hollow_exit_after": 0.1, "hollow_exit_code": 2})
    # each start exits with 2 again: restarted up to max_restarts (5), then failed
    done = system.wait_state(dep["id"], "failed", timeout=60)
    assert done["restarts"] == 5 and "gave up after 5 restarts" in done["reason"]
    assert states_of(system, dep["id"]).count("restarting") == 5


@pytest.mark.slow
def test_killing_a_hollow_node_fails_its_deployments_over_in_a_new_generation(make_system: Any, tmp_path: Path) -> None:
    # Given two hollow processes of one node each, and deployments on both
    system = make_system(nodes=0, provider="static")
    add_algorithm(system.ctl.registry, tmp_path)
    start_hollow(system, 1, "hollow-a")
    start_hollow(system, 1, "hollow-b")
    nodes = set(system.wait_nodes_up(2))
    deps = [system.deploy(ALGORITHM) for _ in range(6)]
    first = {d["id"]: system.wait_state(d["id"], "running") for d in deps}
    victim = first[deps[0]["id"]]["node"]
    (survivor,) = nodes - {victim}
    moved = [dep_id for dep_id, doc in first.items() if doc["node"] == victim]

    # When the victim is killed (its presence connection and lease go, as with kill -9)
    system.ctl.redis.sadd(hollow.KILL_KEY, victim)

    # Then it is dead, and each of its deployments runs on the other node one generation up
    wait_for(lambda: (system.ctl.registry.get_node(victim) or {}).get("state") == "dead", what="victim dead")
    for dep_id in moved:
        doc = wait_for(
            lambda dep_id=dep_id: (
                (d := system.deployment(dep_id))["state"] == "running" and d["node"] == survivor and d
            ),
            what=f"{dep_id} running on node-{survivor}",
        )
        assert doc["generation"] == 2
        assert states_of(system, dep_id)[-3:] == ["lost", "scheduled", "running"]
    # and what ran on the survivor never moved
    for dep_id in set(first) - set(moved):
        assert system.deployment(dep_id)["generation"] == 1


def test_hollow_leases_are_what_fleet_publish_writes(stack: Any) -> None:
    """The hollow nodes' one-pipeline renewal leaves Redis as fleet.publish node by node does."""
    r = fleet.redis_client(stack.redis_url)
    r.flushdb()
    for node_id in ("h1", "h2", "d1", "d2"):
        fleet.register_node(r, node_id, cpus=4, memory=4096, state="up")
    fleet.set_state(r, "h2", "dead")
    fleet.set_state(r, "d2", "dead")
    batched = hollow.publish_all(r, [MetricsSample("h1", 10, 20, ts=5.0), MetricsSample("h2", 1, 2, ts=5.0)], 3, "t")
    direct = {n: fleet.publish(r, MetricsSample(n, cpu, ram, ts=5.0), 3, "t") for n, cpu, ram in
              (("d1", 10, 20), ("d2", 1, 2))}  # fmt: skip
    assert batched == {"h1": "up", "h2": "dead"} and direct == {"d1": "up", "d2": "dead"}
    for h, d in (("h1", "d1"), ("h2", "d2")):
        # but for when it registered, and its entry in the placement index (which names it)
        def fields(node: str) -> dict[str, str]:
            return {key: v for key, v in r.hgetall(k.node(node)).items() if key not in ("since", "imember")}

        assert fields(h) == fields(d)
        assert r.hget(k.node(h), "imember") == (None if h == "h2" else "000000000|h1")
        assert r.get(k.lease(h)) == r.get(k.lease(d)) == "t"
        assert 2000 < r.pttl(k.lease(h)) <= 3000


def test_hollow_nodes_read_the_task_messages_the_control_plane_sends(stack: Any) -> None:
    """dm.run as dm.sender pushes it and dm.kill as Celery's send_task does, read off the queue."""
    from dm.app import app
    from dm.sender import TaskSender

    app.conf.broker_url = app.conf.result_backend = stack.redis_url
    r = fleet.redis_client(stack.redis_url)
    r.delete("node.msg")
    import dm.control
    from dm.settings import Settings

    dm.control._control = Control(Settings(redis_url=stack.redis_url, mongo_url=stack.mongo_url))  # the signing key
    payload = {"id": "d1", "generation": 2, "args": {"a": [1]}}
    TaskSender(app).send([("dm.run", "node.msg", [payload], {}, "d1")])
    app.send_task("dm.kill", args=["d1", 2, "stopped by request"], queue="node.msg")
    got = [hollow.decode(raw.encode()) for raw in reversed(r.lrange("node.msg", 0, -1))]
    (run, run_args, _), kill = got
    assert run == "dm.run" and {k_: v for k_, v in run_args[0].items() if k_ != "sig"} == payload
    assert run_args[0]["sig"]  # signed by the control plane (dm/signing.py)
    assert kill == ("dm.kill", ["d1", 2, "stopped by request"], {})


# -- every query the code makes is served by an index -----------------------------------


class Queries(monitoring.CommandListener):
    """Records the reads and filtered writes this process sends to MongoDB."""

    KINDS = ("find", "aggregate", "count", "distinct", "update", "delete", "findAndModify")

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.database = ""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in self.KINDS and event.database_name == self.database:
            with self.lock:
                self.seen.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def plans(command: str, doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(collection, filter, explain command) for each query of a command; none for a change stream."""
    coll = str(doc[command])
    if command == "find":
        return [(coll, doc.get("filter") or {}, {"find": coll, "filter": doc.get("filter") or {},
                                                 **({"sort": doc["sort"]} if doc.get("sort") else {})})]  # fmt: skip
    if command in ("update", "delete"):  # explained as a find of each filter (see the module)
        key = "updates" if command == "update" else "deletes"
        return [(coll, u.get("q") or {}, {"find": coll, "filter": u.get("q") or {}}) for u in doc[key]]
    if command == "findAndModify":
        return [(coll, doc.get("query") or {}, {"find": coll, "filter": doc.get("query") or {}})]
    if command == "aggregate":
        pipeline = doc.get("pipeline") or []
        if pipeline and "$changeStream" in pipeline[0]:
            return []
        first = pipeline[0].get("$match", {}) if pipeline else {}
        return [(coll, first, {"aggregate": coll, "pipeline": pipeline, "cursor": {}})]
    if command == "count":
        return [(coll, doc.get("query") or {}, {"count": coll, "query": doc.get("query") or {}})]
    return [(coll, doc.get("query") or {}, {"distinct": coll, "key": doc["key"], "query": doc.get("query") or {}})]


def scans(reply: Any) -> bool:
    """True when an explain reply's chosen plan has a collection scan (rejected plans aside)."""
    if isinstance(reply, dict):
        if reply.get("stage") == "COLLSCAN":
            return True
        return any(scans(v) for k, v in reply.items() if k not in ("rejectedPlans", "command"))
    if isinstance(reply, list):
        return any(scans(v) for v in reply)
    return False


#: reads of a whole collection by design (their answer is every document), with why
WHOLE = {
    ("nodes", "{}"): "dm nodes / dm status list every node",
    ("algorithms", "{}"): "dm algorithms list; the names an unknown-algorithm error offers",
    ("deployments", "{}"): "the relay's first start copies every deployment's history (catch-up)",
    ("packages.files", "{}"): "GridFS (pymongo) looks for any file before an upload, to make its indexes",
    ("packages.chunks", "{}"): "GridFS (pymongo) looks for any chunk before an upload, to make its indexes",
}


#: scans found by this test that no index can serve on SecantusDB: the query must change
#: (in files of the lifecycle refactor), with what to change it to. Anything else fails.
NOT_YET = {}


@pytest.mark.slow
def test_every_query_the_code_makes_is_served_by_an_index(make_system: Any, tmp_path: Path) -> None:
    from dm import relay
    from dm.metrics import DMCollector
    from dm.status import deployment_counts, list_deployments, node_rows, recent_events

    queries = Queries()
    monitoring.register(queries)  # clients made from now on report to it
    base = make_system(nodes=0, control=False, beat=False, provider="static")
    queries.database = base.database
    # a client of its own (another URL), so this process's queries reach the listener
    mongo = base.settings.mongo_url
    url = mongo + ("&" if "?" in mongo else "?" if mongo.endswith("/") else "/?") + "appName=explain-test"
    ctl = Control(base.settings.with_(mongo_url=url, start_timeout=1.0))
    import dm.control

    dm.control._control = ctl
    ctl.registry.ensure_indexes()
    add_algorithm(ctl.registry, tmp_path, policy="on-failure")
    add_algorithm(ctl.registry, tmp_path, name="other")
    the_relay = relay.Relay(ctl)
    the_relay.start()
    nodes = hollow.HollowFleet(ctl.settings, cpus=4, memory=4096, threads=1, pid=0)  # pid 0: none
    nodes.start()
    try:
        # the control plane's paths, against hollow nodes in this process
        a, b = nodes.add(2)
        docs = [deployer.deploy(ctl.ports, DeployRequest(algorithm=ALGORITHM, request_id=f"r{i}")) for i in range(4)]
        deployer.deploy(ctl.ports, DeployRequest(algorithm=ALGORITHM, request_id="r0"))  # the same request again
        exits = deployer.deploy(ctl.ports, DeployRequest(algorithm=ALGORITHM, args={"hollow_exit_after": 0.1,
                                                                             "hollow_exit_code": 1}))  # fmt: skip
        (waiting, _), *_ = ctl.registry.create_deployments([(DeployRequest(algorithm="other", request_id="k1"),
                                                             ctl.algorithm("other"))])  # fmt: skip
        deployer.place(ctl.ports, waiting["_id"])
        wait_for(lambda: all(ctl.registry.get_deployment(d["_id"])["state"] == "running" for d in docs), what="run")
        deployer.stop(ctl.ports, docs[0]["_id"])
        wait_for(lambda: ctl.registry.get_deployment(docs[0]["_id"])["state"] == "stopped", what="stopped")
        wait_for(lambda: ctl.registry.get_deployment(exits["_id"])["restarts"] >= 1, what="a restart")
        reconcilers.run_all(ctl.ports)
        nodes.kill(a)  # failover: dead node, lost, placed again
        wait_for(lambda: reconcilers.run_all(ctl.ports)["detect"].get("dead"), timeout=30, what="node seen dead")
        reconcilers.run_all(ctl.ports, now=time.time() + 60)  # past the start timeout: the unstarted ones
        wait_for(lambda: any(cmd == "find" and isinstance((d.get("filter") or {}).get("_id"), dict)
                             for cmd, d in list(queries.seen)), what="the ownership check")  # fmt: skip
        # what operators read
        node_rows(ctl)
        deployment_counts(ctl)
        wait_for(lambda: recent_events(ctl, 10), what="events relayed")
        for kwargs in ({}, {"states": ["running"]}, {"states": ["running", "stopped"]}, {"node": b},
                       {"node": b, "states": ["running"]}, {"algorithm": ALGORITHM}, {"service": "s"},
                       {"algorithm": ALGORITHM, "states": ["failed"]}, {"before": time.time()}):  # fmt: skip
            list_deployments(ctl, **kwargs)  # type: ignore[arg-type]
        ctl.registry.list_events(docs[1]["_id"])
        ctl.registry.get_deployment("r1")
        ctl.registry.fetch_archive(ctl.algorithm(ALGORITHM)["sha256"])
        ctl.registry.list_algorithms()
        ctl.registry.get_algorithm(ALGORITHM)
        list(DMCollector(ctl).collect())
    finally:
        nodes.stop(handover=True)  # the agent's handover: active_on, lost, place
        the_relay.stop.set()
        the_relay.join(5)
        dm.control._control = None

    client: pymongo.MongoClient[dict[str, Any]] = ctl.registry.db.client
    database = client[base.database]
    assert len(queries.seen) > 50
    checked: dict[str, str] = {}
    for command, doc in queries.seen:
        for coll, filter_, explain in plans(command, doc):
            shape = f"{command} {coll} {json.dumps(filter_, sort_keys=True, default=str)}"
            key = (coll, json.dumps(filter_, sort_keys=True, default=str))
            if key in WHOLE or shape in checked:
                continue
            if "_id" in filter_ and not isinstance(filter_["_id"], dict) and len(filter_) > 1:
                explain = {"find": coll, "filter": {"_id": filter_["_id"]}}  # fetched by _id (see the module)
            reply = database.command("explain", explain, verbosity="queryPlanner")
            checked[shape] = "COLLSCAN" if scans(reply) else "index"
    scanned = sorted(shape for shape, how in checked.items() if how == "COLLSCAN")
    unknown = [shape for shape in scanned if not any(shape.startswith(known) for known in NOT_YET)]
    assert not unknown, "queries that scan a collection:\n" + "\n".join(unknown)
    # the ones that matter most were seen (the scenario exercises them)
    assert any("scheduled_at" in s for s in checked), checked
    assert any(s.startswith("aggregate deployments") and "state" in s for s in checked), checked


@pytest.mark.slow
def test_dm_deployments_pages_newest_first_with_filters(make_system: Any, tmp_path: Path) -> None:
    """`dm deployments`: the newest first, a page at a time, filtered; through the windows of
    created_at it reads (seconds old to years old), to the same answer as reading them all."""
    system = make_system(nodes=0, control=False, beat=False)
    registry = system.ctl.registry
    add_algorithm(registry, tmp_path)
    add_algorithm(registry, tmp_path, name="other")
    now = time.time()
    ages = [1, 5, 30, 200, 4000, 90_000, 3e6, 5e7, 4e8]  # one in each window, and past the last
    docs = []
    for i, age in enumerate(ages):
        name = ALGORITHM if i % 2 == 0 else "other"
        doc = registry.new_deployment(DeployRequest(algorithm=name), system.ctl.algorithm(name), node=str(i % 3))
        doc.update(created_at=now - age, state="running" if i % 3 else "failed", service="web" if i < 4 else None)
        docs.append(doc)
    registry.deployments.insert_many(docs)
    newest = [d["_id"] for d in docs]  # made newest first

    def listed(*args: str) -> list[str]:
        out = system.dm("deployments", "--json", *args)
        assert out.returncode == 0, out.stderr
        return [row["id"] for row in json.loads(out.stdout)]

    assert listed() == newest
    assert listed("--limit", "3") == newest[:3]
    last = registry.get_deployment(newest[2])["created_at"]
    assert listed("--limit", "3", "--before", repr(last)) == newest[3:6]
    assert listed("--all") == newest
    assert listed("--state", "failed") == [d["_id"] for d in docs if d["state"] == "failed"]
    assert listed("--state", "failed,running", "--limit", "4") == newest[:4]
    assert listed("--node", "1") == [d["_id"] for d in docs if d["node"] == "1"]
    assert listed("--algorithm", "other", "--state", "running") == [
        d["_id"] for d in docs if d["algorithm"] == "other" and d["state"] == "running"
    ]
    assert listed("--service", "web", "--limit", "2") == newest[:2]
    bad = system.dm("deployments", "--limit", "0")
    assert bad.returncode == 1 and "--all lists every deployment" in bad.stderr
    table = system.dm("deployments", "--limit", "2").stdout
    assert "older ones: --before" in table


class CountingCollection:
    """The deployments collection, counting the documents its reads return."""

    def __init__(self, col: Any) -> None:
        self.col, self.read = col, 0

    def find(self, *args: Any, **kwargs: Any) -> CountingCollection:
        self.cursor = self.col.find(*args, **kwargs)
        return self

    def sort(self, *args: Any) -> CountingCollection:
        self.cursor = self.cursor.sort(*args)
        return self

    def limit(self, n: int) -> CountingCollection:
        self.cursor = self.cursor.limit(n)
        return self

    def __iter__(self) -> Any:
        for doc in self.cursor:
            self.read += 1
            yield doc


@pytest.mark.slow
def test_the_first_page_an_hour_after_a_burst_reads_about_a_page(make_system: Any, tmp_path: Path) -> None:
    """`dm deployments` starts its newest-first windows at the newest deployment the relay has
    seen: a page read an hour after a burst of 3,000 reads a window of them, not the burst
    (from now, the window that reaches the burst an hour back is as wide as the hour)."""
    from dm import relay
    from dm.status import list_deployments

    system = make_system(nodes=0, control=False, beat=False)
    ctl = system.ctl
    registry = ctl.registry
    add_algorithm(registry, tmp_path)
    the_relay = relay.Relay(ctl)
    the_relay.start()
    try:
        hour_ago = time.time() - 3600
        docs = []
        for i in range(3000):  # 1,000 a second, an hour ago
            doc = registry.new_deployment(DeployRequest(algorithm=ALGORITHM), ctl.algorithm(ALGORITHM), node="1")
            doc.update(created_at=hour_ago + i / 1000, state="running")
            docs.append(doc)
        registry.deployments.insert_many(docs)
        newest = hour_ago + 2.999
        wait_for(lambda: (registry.newest_created() or 0) >= newest, timeout=60, what="the relay to see the burst")
        assert registry.newest_created() == pytest.approx(newest)
        truth = [d["_id"] for d in sorted(docs, key=lambda d: (-d["created_at"], d["_id"]))[:50]]

        counting = CountingCollection(registry.deployments)
        registry.deployments = counting  # type: ignore[assignment]
        # filtered by algorithm: no limit on the reads, so what they return is what they match
        assert [d["_id"] for d in list_deployments(ctl, algorithm=ALGORITHM)] == truth
        assert counting.read <= 500, f"the first page read {counting.read} deployments"

        # a relay that has not saved its position for long is not believed: from now, the
        # windows read the whole burst (what the relay's mark saves)
        the_relay.stop.set()
        the_relay.join(5)
        registry.db["meta"].update_one({"_id": "relay"}, {"$set": {"at": 0.0}})
        counting.read = 0
        assert [d["_id"] for d in list_deployments(ctl, algorithm=ALGORITHM)] == truth
        assert counting.read == 3000
    finally:
        the_relay.stop.set()
        the_relay.join(5)
