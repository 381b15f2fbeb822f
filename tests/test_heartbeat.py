"""Failover, restarts and fencing against real servers and real node processes."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dm import fleet
from dm import keys as k
from dm.embedded import stop_pid
from dm.models import Demand
from tests.ledger import instances, overlaps
from tests.system import EXAMPLES, System, alive, wait_for
from workers.outbox import Outbox


def variant(tmp_path: Path, base: str, name: str, **fields: str) -> Path:
    """A copy of an example with other fields in algorithm.toml (``restart_policy='"always"'``)."""
    target = tmp_path / name
    shutil.copytree(EXAMPLES / base, target)
    toml = (target / "algorithm.toml").read_text()
    toml = re.sub(r'^name = ".*"$', f'name = "{name}"', toml, flags=re.M)
    for key, value in fields.items():
        section, _, field = key.partition("__")
        if field:  # a key of a [section]
            toml = re.sub(rf"(\[{section}\][^\[]*?)^{field} = .*$", rf"\g<1>{field} = {value}", toml, flags=re.M | re.S)
            if f"{field} = {value}" not in toml:
                toml = toml.replace(f"[{section}]\n", f"[{section}]\n{field} = {value}\n")
        elif re.search(rf"^{key} = ", toml, flags=re.M):
            toml = re.sub(rf"^{key} = .*$", f"{key} = {value}", toml, flags=re.M)
        else:
            toml = f"{key} = {value}\n" + toml
    (target / "algorithm.toml").write_text(toml)
    return target


def events_of(system: System, dep_id: str) -> list[dict]:
    return system.ctl.registry.list_events(dep_id, limit=1000)


def service_on_one_of_two_nodes(make_system, tmp_path: Path) -> tuple[System, Path, dict, dict]:
    """A system of two nodes and the service running on one: (system, its ledger, the
    deployment as deployed, as running)."""
    system = make_system(nodes=2)
    system.add_examples("service")
    ledger = tmp_path / "ledger"
    dep = system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)})
    return system, ledger, dep, system.wait_state(dep["id"], "running")


def test_kill_9_of_a_node_moves_its_algorithm_to_another_node_and_its_process_is_gone(make_system, tmp_path):
    # Given a long-running algorithm on one of two nodes
    system, ledger, dep, first = service_on_one_of_two_nodes(make_system, tmp_path)

    # When that node's agent is killed with SIGKILL
    os.kill(system.node_pid(first["node"]), signal.SIGKILL)

    # Then the algorithm runs on the other node in a new generation, and the old process is gone
    moved = wait_for(
        lambda: (
            (d := system.deployment(dep["id"]))["state"] == "running" and d["generation"] > first["generation"] and d
        ),
        timeout=20,
        what="the deployment running again elsewhere",
    )
    assert moved["node"] != first["node"]
    wait_for(lambda: not alive(first["pid"]), 5, what="the old algorithm process to die with its node")
    assert system.ctl.registry.get_node(first["node"])["state"] == "dead"
    reasons = [e["reason"] for e in events_of(system, dep["id"]) if e["state"] == "lost"]
    assert reasons and f"node-{first['node']}" in reasons[0]
    wait_for(lambda: len(instances(ledger)[dep["id"]]) == 2, 5, what="the second instance in the ledger")
    assert overlaps(ledger) == []


def test_a_node_stopped_cleanly_hands_its_algorithm_to_another_node_without_running_it_twice(make_system, tmp_path):
    # Given a long-running algorithm on one of two nodes
    system, ledger, dep, first = service_on_one_of_two_nodes(make_system, tmp_path)

    # When that node is stopped as `dm down` and scale-in stop one (SIGTERM to its process group)
    stop_pid(system.node_pid(first["node"]), 30)

    # Then its node recorded the hand-over (lost, its reason naming the stop), the old process
    # is gone, and the algorithm runs on the other node in a new generation, never twice at once
    assert not alive(first["pid"])
    assert system.ctl.registry.get_node(first["node"])["state"] == "stopped"
    lost = [e for e in events_of(system, dep["id"]) if e["state"] == "lost"]
    assert lost and lost[0]["reason"] == f"node-{first['node']} stopped" and lost[0]["generation"] == 1
    moved = wait_for(
        lambda: (
            (d := system.deployment(dep["id"]))["state"] == "running" and d["generation"] > first["generation"] and d
        ),
        timeout=30,
        what="the deployment running again elsewhere",
    )
    assert moved["node"] != first["node"] and alive(moved["pid"])
    wait_for(lambda: len(instances(ledger)[dep["id"]]) == 2, 5, what="the second instance in the ledger")
    assert overlaps(ledger) == []


def test_on_failure_restarts_three_times_with_backoff_then_fails(make_system, tmp_path):
    system = make_system(nodes=1)
    system.add_algorithm(variant(tmp_path, "crash", "crash3", restart__max_restarts="3", restart__backoff="0.2"))
    dep = system.deploy("crash3", args={"after": 0.05})

    failed = system.wait_state(dep["id"], "failed", timeout=30)

    assert failed["restarts"] == 3
    assert "gave up after 3 restarts" in failed["reason"]
    events = events_of(system, dep["id"])
    running = [e for e in events if e["state"] == "running"]
    restarting = [e for e in events if e["state"] == "restarting"]
    assert len(running) == 4 and len(restarting) == 3
    assert {e["node"] for e in running} == {failed["node"]}  # all on the same node
    assert {e["generation"] for e in events if e["state"] != "pending"} == {1}
    # backoff doubles: 0.2, 0.4, 0.8 s between an exit and the next start
    gaps = [r["time"] - x["time"] for x, r in zip(restarting, running[1:], strict=True)]
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert gap >= expected * 0.9, gaps
    assert "restart 1/3" in restarting[0]["reason"] and "exit code 3" in restarting[0]["reason"]


def test_always_restarts_a_clean_exit_and_never_does_not_restart(make_system, tmp_path):
    system = make_system(nodes=1)
    always_dir = variant(
        tmp_path, "hello", "hello-always", restart__policy='"always"', restart__max_restarts="2", restart__backoff="0.1"
    )
    system.add_algorithm(always_dir)
    system.add_algorithm(variant(tmp_path, "fail", "fail-never", restart__policy='"never"'))

    always = system.deploy("hello-always")
    never = system.deploy("fail-never")

    done = system.wait_state(always["id"], "succeeded", "failed", timeout=30)
    assert done["state"] == "succeeded" and done["restarts"] == 2
    assert len([e for e in events_of(system, always["id"]) if e["state"] == "running"]) == 3
    failed = system.wait_state(never["id"], "failed", timeout=30)
    assert failed["restarts"] == 0
    assert [e["state"] for e in events_of(system, never["id"])] == ["pending", "scheduled", "running", "failed"]


def test_a_report_for_an_old_generation_is_refused_and_its_process_killed(make_system):
    # Given a running service
    system = make_system(nodes=1)
    system.add_examples("service")
    dep = system.deploy("service", args={"interval": 0.1})
    running = system.wait_state(dep["id"], "running")
    old = running["generation"]

    # When the deployment moves to a new generation on the same node behind the node's back (the
    # registry's record and the fleet's allocation, as a placement writes them; no order sent)
    system.ctl.registry.deployments.update_one({"_id": dep["id"]}, {"$inc": {"generation": 1}})
    demand = Demand.from_dict(running["demand"])
    fleet.allocate(system.ctl.redis, running["node"], dep["id"], demand, generation=old + 1)

    # Then a report for the old generation, sent through a node's outbox, is refused
    answers: list[object] = []
    Outbox(system.ctl, running["node"]).send(
        dep["id"], "restarting", expect=["running"], generation=old, reason="exit code 1, restart 1/5",
        then=answers.append, pid=None,
    )  # fmt: skip
    assert answers == [None]
    after = system.ctl.registry.get_deployment(dep["id"])
    assert (after["state"], after["generation"], after["pid"]) == ("running", old + 1, running["pid"])
    # and the node kills the process it still runs for the old generation
    wait_for(lambda: not alive(running["pid"]), 10, what="the stale process to be killed")


def test_a_frozen_node_fences_itself_and_after_it_resumes_runs_nothing_twice(make_system, tmp_path):
    # Given services on two nodes, with a ledger
    system = make_system(nodes=2, lease_ttl=3)
    system.add_examples("service")
    ledger = tmp_path / "ledger"
    deps = [system.deploy("service", args={"interval": 0.1, "ledger": str(ledger)}) for _ in range(4)]
    docs = [system.wait_state(d["id"], "running") for d in deps]
    victim = docs[0]["node"]
    victims = [d for d in docs if d["node"] == victim]
    agent = system.node_pid(victim)

    # When its agent freezes (SIGSTOP): it can renew nothing
    os.kill(agent, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Then its algorithms are killed within the lease TTL
        wait_for(lambda: not any(alive(d["pid"]) for d in victims), 10, what="the frozen node's algorithms to die")
        assert time.monotonic() - stopped_at <= 3.0 + 0.5
        # and they run again elsewhere
        for d in victims:
            wait_for(
                lambda d=d: (x := system.deployment(d["_id"]))["state"] == "running" and x["node"] != victim,
                20,
                what="the deployment running on another node",
            )
    finally:
        os.kill(agent, signal.SIGCONT)

    # After it resumes, it rejoins empty and nothing ran twice
    wait_for(lambda: system.ctl.registry.get_node(victim)["state"] == "up", 15, what="the node to rejoin")
    time.sleep(2)
    assert overlaps(ledger) == []
    for d in deps:
        assert system.deployment(d["id"])["state"] == "running"


def test_two_beats_and_two_control_workers_place_each_lost_deployment_once(make_system):
    system = make_system(nodes=2)
    system.start_control("control2")
    system.start_beat("beat2")
    system.add_examples("service")
    deps = [system.deploy("service", args={"interval": 0.5}) for _ in range(6)]
    docs = [system.wait_state(d["id"], "running") for d in deps]
    victim = docs[0]["node"]
    on_victim = [d["id"] for d in docs if d["node"] == victim]

    os.kill(system.node_pid(victim), signal.SIGKILL)

    for dep_id in on_victim:
        wait_for(
            lambda dep_id=dep_id: (x := system.deployment(dep_id))["state"] == "running" and x["node"] != victim,
            20,
            what="failover",
        )
    time.sleep(2)  # any second placement would show by now
    for dep_id in on_victim:
        states = [e["state"] for e in events_of(system, dep_id)]
        assert states.count("lost") == 1, states
        assert states.count("scheduled") == 2, states
        assert system.deployment(dep_id)["generation"] == 2


def test_chaos_30_deployments_two_nodes_killed_all_end_running_never_twice(make_system, tmp_path):
    # Given 30 long-running deployments over 3 nodes, each writing to a ledger
    system = make_system(nodes=3, max_nodes=8)
    system.add_algorithm(variant(tmp_path, "service", "ledgered", cpu="0.05", memory="16"))
    ledger = tmp_path / "ledger"
    with ThreadPoolExecutor(8) as pool:
        deps = list(
            pool.map(lambda _: system.deploy("ledgered", args={"interval": 0.1, "ledger": str(ledger)}), range(30))
        )
    before = {d["id"]: system.wait_state(d["id"], "running", timeout=60) for d in deps}
    nodes = sorted({doc["node"] for doc in before.values()})
    assert len(nodes) == 3

    # When two nodes are killed with SIGKILL at random moments
    rng = random.Random()
    victims = rng.sample(nodes, 2)
    for victim in victims:
        time.sleep(rng.uniform(0.2, 2.0))
        os.kill(system.node_pid(victim), signal.SIGKILL)
    moved = [dep_id for dep_id, doc in before.items() if doc["node"] in victims]
    assert moved

    # Then every deployment of a killed node runs again on a live node in a higher generation
    def settled(dep_id: str) -> bool:
        now = system.deployment(dep_id)
        old = before[dep_id]
        if dep_id in moved:
            return now["state"] == "running" and now["node"] not in victims and now["generation"] > old["generation"]
        return now["state"] == "running" and now["generation"] == old["generation"]

    wait_for(lambda: all(settled(d) for d in before), 60, what="every victim's deployment running elsewhere")
    # and the ledger shows each moved one's new instance, never two instances alive at once
    wait_for(lambda: all(any(i.generation > before[d]["generation"] for i in instances(ledger).get(d, []))
                         for d in moved), 10, what="the new instances in the ledger")  # fmt: skip
    assert overlaps(ledger) == []
    assert len(instances(ledger)) == 30


def test_idle_nodes_above_min_nodes_go_away(make_system):
    system = make_system(nodes=1, min_nodes=1, idle_timeout=2)
    system.add_node()
    system.wait_nodes_up(2)

    stopped = wait_for(
        lambda: [n for n in system.ctl.registry.list_nodes() if n["state"] == "stopped"],
        30,
        what="an idle node to stop",
    )

    time.sleep(3)  # min_nodes is kept: the last node stays however long it idles
    assert len(stopped) == 1
    live = [n for n in fleet.snapshot(system.ctl.redis, 0) if n.state in ("up", "starting")]
    assert len(live) == 1
    assert not alive(stopped[0]["pid"])


def test_a_restart_of_the_control_plane_loses_nothing(make_system):
    system = make_system(nodes=2)
    system.add_examples("service", "hello")
    dep = system.deploy("service", args={"interval": 0.2})
    running = system.wait_state(dep["id"], "running")

    # When the control worker and beat are killed and started again
    for name in ("control", "beat"):
        os.kill(system.procs[name].pid, signal.SIGKILL)
        system.procs[name].wait()  # its sockets are closed: it can take no more messages
    restarted = time.time()
    system.start_control()
    system.start_beat()

    # Then, once the new control plane has checked the fleet, what ran still runs (same
    # process, same generation), new deploys work, and a node death still fails over
    wait_for(lambda: float(system.ctl.redis.get(k.HEARTBEAT_LAST) or 0) > restarted + 1, 30,
             what="a failure-detector pass of the new control plane")  # fmt: skip
    after = system.deployment(dep["id"])
    assert (after["state"], after["pid"], after["generation"]) == ("running", running["pid"], running["generation"])
    hello = system.deploy("hello")
    assert system.wait_state(hello["id"], "succeeded")["state"] == "succeeded"
    os.kill(system.node_pid(running["node"]), signal.SIGKILL)
    wait_for(
        lambda: (d := system.deployment(dep["id"]))["state"] == "running" and d["node"] != running["node"],
        20,
        what="failover after the control-plane restart",
    )
