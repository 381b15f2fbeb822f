"""The deploy path against real servers: record, place, run, report."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dm import fleet
from dm.errors import InvalidArgs, UnknownAlgorithm
from dm.models import AlgorithmSpec
from tests.system import EXAMPLES, alive, wait_for


def test_hello_succeeds_and_its_output_with_args_is_in_dm_logs(make_system):
    system = make_system(nodes=1)
    system.add_examples("hello")

    dep = system.deploy("hello", args={"who": "world", "n": 3})

    done = system.wait_state(dep["id"], "succeeded", "failed")
    assert done["state"] == "succeeded"
    assert done["exit_code"] == 0
    logs = system.dm("logs", dep["id"])
    assert logs.returncode == 0, logs.stderr
    assert 'hello {"n": 3, "who": "world"}' in logs.stdout
    states = [e["state"] for e in system.ctl.registry.list_events(dep["id"])]
    assert states == ["pending", "scheduled", "running", "succeeded"]


def test_ten_burns_on_one_node_add_nodes_and_never_pass_the_threshold(make_system):
    # Given one node and two control workers deploying at once
    system = make_system(nodes=1, max_nodes=8)
    system.start_control("control2")
    system.add_examples("burn")
    burn_cpu = AlgorithmSpec.from_dict(system.ctl.registry.get_algorithm("burn")["spec"]).demand.cpu

    # When 10 burns are deployed concurrently
    with ThreadPoolExecutor(10) as pool:
        deps = list(pool.map(lambda i: system.deploy("burn", args={"share": 0.05}, timeout=60), range(10)))

    # Then all run, on at least 2 nodes, and no node's declared demand passes 80%
    for dep in deps:
        system.wait_state(dep["id"], "running", timeout=60)
    placed: dict[str, float] = defaultdict(float)
    for dep in deps:
        placed[system.deployment(dep["id"])["node"]] += burn_cpu
    live = [n for n in fleet.snapshot(system.ctl.redis, 0) if n.state in ("up", "starting")]
    assert len(live) >= 2
    assert len(placed) >= 2
    for node in live:
        assert placed.get(node.id, 0.0) <= 0.8 * node.cpus + 1e-9, f"node-{node.id} holds {placed[node.id]} cores"


def test_the_same_request_id_twice_makes_one_deployment(make_system):
    system = make_system(nodes=1)
    system.add_examples("hello")

    first = system.deploy("hello", request_id="req-42")
    second = system.deploy("hello", request_id="req-42")

    assert first["id"] == second["id"]
    assert system.ctl.registry.deployments.count_documents({"request_id": "req-42"}) == 1


def test_unknown_algorithm_is_a_clear_error_and_records_nothing(make_system):
    system = make_system(nodes=1)
    with pytest.raises(UnknownAlgorithm, match="dm algorithms add"):
        system.deploy("no-such-algorithm")
    assert system.ctl.registry.deployments.count_documents({}) == 0

    result = system.dm("deploy", "no-such-algorithm")
    assert result.returncode == 3
    assert "unknown algorithm 'no-such-algorithm'" in result.stderr


def test_args_the_algorithm_does_not_allow_are_refused_and_record_nothing(make_system):
    system = make_system(nodes=1)
    system.add_examples("fail")
    with pytest.raises(InvalidArgs, match="allowed: code"):
        system.deploy("fail", args={"bogus": 1})
    assert system.ctl.registry.deployments.count_documents({}) == 0


def test_a_package_without_algorithm_toml_is_refused(make_system, tmp_path: Path):
    system = make_system(nodes=0, control=False, beat=False)
    package = tmp_path / "broken"
    package.mkdir()
    (package / "main.py").write_text("print('hi')\n")

    result = system.dm("algorithms", "add", str(package))

    assert result.returncode == 1
    assert "has no algorithm.toml" in result.stderr
    assert system.ctl.registry.algorithms.count_documents({}) == 0
    assert system.ctl.registry.fs.find({}).to_list() == []


def test_a_tampered_archive_fails_the_deployment_and_unpacks_nothing(make_system):
    # Given an archive in the repository whose member escapes with '..'
    system = make_system(nodes=1)
    system.add_examples("hello")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"print('evil')\n"
        info = tarfile.TarInfo("../evil.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    doc = system.ctl.registry.get_algorithm("hello")
    spec = AlgorithmSpec.from_dict({**doc["spec"], "version": "6.6.6"})
    import hashlib

    archive = buf.getvalue()
    system.ctl.registry.add_algorithm(spec, archive, hashlib.sha256(archive).hexdigest())

    # When it is deployed
    dep = system.deploy("hello", version="6.6.6")

    # Then the deployment fails with the reason, and nothing was written outside the cache
    failed = system.wait_state(dep["id"], "failed")
    assert "cannot unpack" in failed["reason"] and "evil.py" in failed["reason"]
    assert not (system.home / "evil.py").exists()
    assert not list((system.home / "cache").glob(f"{hashlib.sha256(archive).hexdigest()}*"))


def test_stop_ends_a_running_service_and_its_process(make_system):
    system = make_system(nodes=1)
    system.add_examples("service")
    dep = system.deploy("service", args={"interval": 0.2})
    running = system.wait_state(dep["id"], "running")

    result = system.dm("stop", dep["id"], "--json")

    assert result.returncode == 0, result.stderr
    stopped = system.wait_state(dep["id"], "stopped")
    assert stopped["state"] == "stopped"
    wait_for(lambda: not alive(running["pid"]), 10, what="the service process to exit")
    assert fleet.allocations(system.ctl.redis, running["node"]) == {}


def test_a_crashed_package_copy_is_fetched_again(make_system):
    # the node's cache is keyed by sha256 and verified; a removed cache dir is fetched again
    system = make_system(nodes=1)
    system.add_examples("hello")
    first = system.deploy("hello")
    system.wait_state(first["id"], "succeeded")
    shutil.rmtree(system.home / "cache")
    (system.home / "cache").mkdir()
    second = system.deploy("hello")
    assert system.wait_state(second["id"], "succeeded", "failed")["state"] == "succeeded"


def test_a_listing_piped_into_a_reader_that_quits_early_ends_quietly(make_system):
    # Given some events to list
    system = make_system(nodes=1)
    system.add_examples("hello")
    dep = system.deploy("hello")
    system.wait_state(dep["id"], "succeeded")

    # When `dm events` writes into a pipe whose reader has gone (like `| head -1`)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dm", "events", "--follow"],
        env=system.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()
    system.deploy("hello")  # more events to write into the closed pipe
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Then it exits 0 without a traceback
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


def test_a_version_added_is_the_one_deployed_next(make_system, tmp_path):
    # the control worker caches algorithm documents: adding a version must show at once
    system = make_system(nodes=1)
    system.add_examples("hello")
    first = system.wait_state(system.deploy("hello")["id"], "succeeded")
    newer = tmp_path / "hello2"
    shutil.copytree(EXAMPLES / "hello", newer)
    toml = newer / "algorithm.toml"
    toml.write_text(toml.read_text().replace('version = "1.0.0"', 'version = "1.1.0"'))
    system.add_algorithm(newer)
    second = system.wait_state(system.deploy("hello")["id"], "succeeded")
    assert (first["version"], second["version"]) == ("1.0.0", "1.1.0")


def test_a_node_that_just_started_takes_a_burst_without_a_second_node(make_system):
    # Given one node starting (its agent spends about a core starting up: that is not load)
    system = make_system(nodes=0, max_nodes=4)
    system.add_examples("service")
    node = system.add_node()
    # its second sample covers its start-up (the first cannot: cpu is measured between two samples)
    first = wait_for(lambda: system.ctl.redis.hget(f"dm:node:{node}", "ts"), 30, interval=0.01, what="a sample")
    wait_for(lambda: system.ctl.redis.hget(f"dm:node:{node}", "ts") != first, 30, interval=0.01, what="a second")

    # When five services (0.1 cpu each, half the node) are deployed at once, as it comes up
    deps = [system.deploy("service", args={"interval": 0.5}) for _ in range(5)]
    docs = [system.wait_state(d["id"], "running") for d in deps]

    # Then they all run on that node, and no node was added
    assert {d["node"] for d in docs} == {node}
    live = [n.id for n in fleet.snapshot(system.ctl.redis, 0) if n.state in ("up", "starting")]
    assert live == [node]


def test_a_run_order_sent_twice_starts_one_copy_that_runs_and_stops(make_system):
    # Given a node, and a deployment recorded scheduled on it whose order was never sent
    from dm.models import DeployRequest

    system = make_system(nodes=1, start_timeout=300)
    system.add_examples("service")
    node_id = system.wait_nodes_up(1)[0]
    algorithm = system.ctl.registry.get_algorithm("service")
    doc, _ = system.ctl.registry.create_deployment(DeployRequest("service"), algorithm, node=node_id, reason="test")

    # When its run order reaches the node twice (a resend, a redelivery)
    system.ctl.ports.dispatcher.run(doc, None, None)
    system.ctl.ports.dispatcher.run(doc, None, None)

    # Then the node starts it once and says it ignored the second order
    node_log = system.home / "nodes" / f"node-{node_id}.log"
    wait_for(lambda: "order ignored" in node_log.read_text(), 30, what="the second order ignored")
    running = system.wait_state(doc["_id"], "running", timeout=30)
    assert alive(running["pid"]) and running["generation"] == 1
    assert Path(running["log"]).read_text().count("--- dm: gen 1") == 1
    # and the copy it runs is the one the registry names: a stop ends it
    from dm import deployer

    deployer.stop(system.ctl.ports, doc["_id"])
    assert system.wait_state(doc["_id"], "stopped", timeout=30)["state"] == "stopped"
    wait_for(lambda: not alive(running["pid"]), 10, what="the process gone")


def test_a_batch_placement_does_not_take_a_deployment_another_placer_moved_for_its_own(make_system):
    # Given a pending deployment, read by a batch placer
    from dm.models import DeployRequest

    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    store = system.ctl.ports.store
    algorithm = system.ctl.registry.get_algorithm("hello")
    stale, _ = system.ctl.registry.create_deployment(DeployRequest("hello"), algorithm)
    other, _ = system.ctl.registry.create_deployment(DeployRequest("hello"), algorithm)

    # When a single placement moves it to the same rev and state first
    won = store.compare_and_set(
        stale["_id"], "scheduled", expect=["pending"], generation=stale["generation"], reason="placed on node-1",
        new_generation=True, current=None, seen=lambda _: None, fields={"node": "1"},
    )  # fmt: skip
    assert won is not None and won["rev"] == stale["rev"] + 1

    # Then the batch's compare-and-set counts only what it moved itself
    moved = store.compare_and_set_many(
        [stale, other], "scheduled", reason="placed", fields={}, each=[{"node": "2"}, {"node": "2"}],
        new_generation=True,
    )  # fmt: skip
    assert [d["_id"] for d in moved] == [other["_id"]]
    assert store.get(stale["_id"])["node"] == "1"
