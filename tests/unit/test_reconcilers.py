"""The reconcilers against the memory ports: failure detection, fail-over, re-placement,
scale-in and allocations."""

from __future__ import annotations

import time
from types import SimpleNamespace

from dm import deployer
from dm import keys as k
from dm.adapters.memory import MemoryPorts
from dm.lifecycle import Actor, D, transition
from dm.models import Demand, DeployRequest
from dm.reconcilers import allocations, detect, replace, scale


def warm(ports: MemoryPorts) -> float:
    """Passes of the detector over a first lease period (no lease verdicts on a new Redis); the time after."""
    now = time.time()
    for i in range(int(ports.settings.lease_ttl * 2) + 2):
        detect.run(ports, now + 0.5 * i)
    return now + 0.5 * (int(ports.settings.lease_ttl * 2) + 2)


def deploy(ports: MemoryPorts, name: str = "hello") -> dict:
    return deployer.deploy(ports, DeployRequest(algorithm=name))


def running_on(ports: MemoryPorts, node: str, count: int = 2) -> list[dict]:
    """``count`` deployments placed on ``node`` (the other node full for the moment)."""
    others = [n for n in ports.fleet.nodes if n != node]
    for other in others:
        ports.fleet.nodes[other].state = "dead"
    docs = [deploy(ports) for _ in range(count)]
    for other in others:
        ports.fleet.nodes[other].state = "up"
    assert {d["node"] for d in docs} == {node}
    return docs


def test_a_node_whose_lease_expired_is_dead_and_its_deployments_move_in_a_new_generation(ports: MemoryPorts) -> None:
    docs = running_on(ports, "1")
    now = warm(ports)
    ports.fleet.nodes["1"].lease = False
    ports.fleet.no_presence = True  # presence cannot be seen: only the lease tells
    done = detect.run(ports, now)
    assert done["dead"] == ["1"] and done["failed_over"] == 2
    assert ports.nodes.get_node("1")["state"] == "dead"
    for doc in docs:
        moved = ports.store.get(doc["_id"])
        assert (moved["state"], moved["node"], moved["generation"]) == ("scheduled", "2", 2)
        states = [e["state"] for e in ports.store.history(doc["_id"])]
        assert states == ["pending", "scheduled", "lost", "scheduled"]
    assert ports.fleet.allocations("1") == {}


def test_a_second_detector_finds_nothing_left_to_do(ports: MemoryPorts) -> None:
    docs = running_on(ports, "1")
    now = warm(ports)
    ports.fleet.nodes["1"].lease = False
    detect.run(ports, now)
    # another detector that observed the same: the node's compare-and-set is lost, nothing moves twice
    assert detect.fail_over(ports, "1", "node-1 lease expired") == 0
    assert all(ports.store.get(d["_id"])["generation"] == 2 for d in docs)
    assert len(ports.dispatcher.runs()) == 4  # two first placements, two moves


def test_a_presence_connection_missing_in_two_passes_in_a_row_is_a_dead_node(ports: MemoryPorts) -> None:
    running_on(ports, "1", 1)
    now = time.time()
    detect.run(ports, now)  # seen present in this server run
    ports.fleet.nodes["1"].present = False
    assert detect.run(ports, now + 0.5)["dead"] == []  # once: could be a reconnect
    assert detect.run(ports, now + 1.0)["dead"] == ["1"]


def test_a_connection_back_before_the_second_pass_is_no_failure(ports: MemoryPorts) -> None:
    now = time.time()
    detect.run(ports, now)
    ports.fleet.nodes["1"].present = False
    detect.run(ports, now + 0.5)
    ports.fleet.nodes["1"].present = True
    assert detect.run(ports, now + 1.0)["dead"] == []
    assert "1" not in ports.fleet.marks(k.ABSENT_SINCE)


def test_presence_counts_only_once_seen_in_this_server_run(ports: MemoryPorts) -> None:
    now = time.time()
    detect.run(ports, now)
    ports.fleet.server = "run-2"  # Redis restarted: every node is reconnecting
    ports.fleet.nodes["1"].present = False
    assert detect.run(ports, now + 0.5)["dead"] == []
    assert detect.run(ports, now + 1.0)["dead"] == []


def test_an_agent_process_that_exited_is_a_dead_node_at_once(ports: MemoryPorts) -> None:
    ports.provider.gone.append("2")
    assert detect.run(ports)["dead"] == ["2"]


def test_no_lease_verdict_for_a_lease_period_on_a_new_redis(ports: MemoryPorts) -> None:
    now = time.time()
    ports.fleet.nodes["1"].lease = False
    assert detect.run(ports, now)["blind"] is True
    assert detect.run(ports, now + 1.0)["dead"] == []
    assert detect.run(ports, now + 2.0)["dead"] == []
    assert detect.run(ports, now + 2.5)["dead"] == []
    assert detect.run(ports, now + ports.settings.lease_ttl + 0.1)["dead"] == ["1"]


def test_no_lease_verdict_for_a_lease_period_after_redis_restarted(ports: MemoryPorts) -> None:
    now = warm(ports)
    ports.fleet.server = "run-2"
    ports.fleet.nodes["1"].lease = False
    assert detect.run(ports, now + 0.5) == {"dead": [], "failed_over": 0, "blind": True}
    assert detect.run(ports, now + 2.0)["dead"] == []
    assert detect.run(ports, now + 0.5 + ports.settings.lease_ttl + 0.1)["dead"] == ["1"]


def test_no_lease_verdict_for_a_lease_period_after_a_gap_in_the_checks(ports: MemoryPorts) -> None:
    now = warm(ports)
    # Redis stalled 5 s: no pass ran, and every lease lapsed meanwhile
    for node in ports.fleet.nodes.values():
        node.lease = False
    assert detect.run(ports, now + 5.0)["dead"] == []
    for node in ports.fleet.nodes.values():
        node.lease = True  # the nodes renew within the grace
    assert detect.run(ports, now + 5.0 + ports.settings.lease_ttl + 0.1)["dead"] == []


def test_a_pass_that_waited_out_a_stall_records_it(ports: MemoryPorts, monkeypatch) -> None:
    # Given passes every 0.5 s, and a clock the test moves
    clock = [warm(ports)]
    monkeypatch.setattr(detect, "time", SimpleNamespace(time=lambda: clock[0]))
    seen = ports.fleet.observe

    def stalled() -> dict:  # Redis answers this pass's first read 5 s late
        clock[0] += 5.0
        return seen()

    # When a pass starts and Redis stalls under it
    monkeypatch.setattr(ports.fleet, "observe", stalled)
    assert detect.run(ports)["blind"] is True

    # Then the stall is recorded, as long as it was, for `dm status` and the metrics
    marks = ports.fleet.marks(k.DETECTOR)
    assert float(marks["outage_seconds"]) >= 4.5 and "no check for" in marks["outage"]


def test_a_starting_node_has_a_grace_to_publish_its_first_lease(ports: MemoryPorts) -> None:
    node = ports.fleet.add("3", state="starting", lease=False)
    ports.nodes.upsert_node("3", state="starting")
    passes = [node.since + 0.5 * i for i in range(int(detect.NODE_START_GRACE * 2) + 3)]
    dead = {t: detect.run(ports, t)["dead"] for t in passes}
    assert all(v == [] for t, v in dead.items() if t < node.since + detect.NODE_START_GRACE)
    assert dead[passes[-1]] == [] and ["3"] in dead.values()  # dead once, past the grace


def test_a_stopping_deployment_on_a_dead_node_is_stopped_not_moved(ports: MemoryPorts) -> None:
    doc = running_on(ports, "1", 1)[0]
    deployer.stop(ports, doc["_id"])
    now = warm(ports)
    ports.fleet.nodes["1"].lease = False
    detect.run(ports, now)
    stopped = ports.store.get(doc["_id"])
    assert (stopped["state"], stopped["generation"]) == ("stopped", 1)


def test_a_deployment_not_started_in_time_is_placed_again(ports: MemoryPorts) -> None:
    doc = deploy(ports)
    later = time.time() + ports.settings.start_timeout + 1
    assert replace.run(ports, later)["timed_out"] == 1
    moved = ports.store.get(doc["_id"])
    assert (moved["state"], moved["generation"]) == ("scheduled", 2)
    assert "not started" in ports.store.history(doc["_id"])[-2]["reason"]


def test_what_a_cut_short_fail_over_left_on_a_dead_node_is_moved(ports: MemoryPorts) -> None:
    doc = running_on(ports, "1", 1)[0]
    ports.nodes.set_node_state("1", "dead")
    ports.fleet.set_state("1", "dead")  # marked dead, but the moves never happened (an outage)
    assert replace.run(ports)["finished_fail_overs"] == 1
    assert ports.store.get(doc["_id"])["node"] == "2"


def test_a_dead_node_found_empty_is_not_read_again_until_it_rejoins(ports: MemoryPorts) -> None:
    running_on(ports, "1", 1)
    ports.nodes.set_node_state("1", "dead")
    ports.fleet.set_state("1", "dead")
    asked: list[list[str]] = []
    holding = ports.store.nodes_holding
    ports.store.nodes_holding = lambda ids: asked.append(list(ids)) or holding(ids)  # type: ignore[method-assign]
    assert replace.run(ports)["finished_fail_overs"] == 1  # moved off in this pass
    replace.run(ports)  # found empty: marked
    replace.run(ports)
    replace.run(ports)
    assert asked == [["1"], ["1"]] and "1" in ports.fleet.marks(k.MOVED_OFF)
    ports.fleet.set_state("1", "up")  # it rejoined: a later death is looked at again
    ports.fleet.set_state("1", "dead")
    replace.run(ports)
    assert asked[-1] == ["1"]


def test_an_unplaceable_deployment_does_not_hold_up_smaller_ones(ports: MemoryPorts) -> None:
    ports.provider.starts_nodes = False
    big = [deploy(ports, "big") for _ in range(3)]  # two fit, the third waits
    waiting_big = next(d for d in big if d["state"] == "pending")
    for node in ports.fleet.nodes.values():  # the small ones arrive while the nodes look full
        node.cpu = 79.0
    small = deploy(ports)
    assert small["state"] == "pending"
    for node in ports.fleet.nodes.values():
        node.cpu = 0.0
    # Then: room for small ones appears; the big one still cannot fit, the small one is placed
    assert replace.run(ports)["placed"] == 1
    assert ports.store.get(small["_id"])["state"] == "scheduled"
    assert ports.store.get(waiting_big["_id"])["state"] == "pending"


def test_waiting_work_gets_a_new_node_when_room_can_be_added(ports: MemoryPorts) -> None:
    ports.provider.starts_nodes = False
    docs = [deploy(ports, "big") for _ in range(3)]
    waiting = next(d for d in docs if d["state"] == "pending")
    ports.provider.starts_nodes = True
    assert replace.run(ports)["placed"] == 1
    assert ports.store.get(waiting["_id"])["node"] == "3" and ports.provider.started == ["3"]


def test_idle_nodes_above_min_nodes_are_stopped_after_the_idle_timeout(ports: MemoryPorts) -> None:
    now = time.time()
    assert scale.run(ports, now)["scaled_in"] == []  # first seen idle
    assert scale.run(ports, now + ports.settings.idle_timeout + 1)["scaled_in"] == ["1"]
    assert len(ports.provider.stopped) == 1  # min_nodes=1 keeps the other


def test_no_node_is_stopped_while_work_waits_for_room(ports: MemoryPorts) -> None:
    ports.provider.starts_nodes = False
    ports.fleet.nodes["1"].cpu = ports.fleet.nodes["2"].cpu = 90.0
    deploy(ports)
    ports.fleet.nodes["1"].allocs.clear()
    now = time.time()
    scale.run(ports, now)
    assert scale.run(ports, now + ports.settings.idle_timeout + 1)["scaled_in"] == []


def test_a_node_its_provider_cannot_stop_is_asked_once(ports: MemoryPorts) -> None:
    ports.provider.stoppable = False
    calls: list[str] = []
    original = ports.provider.stop_node

    def counting(node_id: str) -> bool:
        calls.append(node_id)
        return original(node_id)

    ports.provider.stop_node = counting  # type: ignore[method-assign]
    now = time.time()
    scale.run(ports, now)
    for i in range(3):
        scale.run(ports, now + ports.settings.idle_timeout + 1 + i)
    assert calls == ["1", "2"]


def test_scale_decision_is_pure() -> None:
    marks, drop, stop = scale.decide([("1", "up", 0), ("2", "up", 3), ("3", "starting", 0)],
                                     {"1": "0", "2": "0"}, 100.0, 60.0, 1)  # fmt: skip
    assert (marks, drop, stop) == ({}, ["2"], ["1"])


def test_allocations_are_rebuilt_from_the_registry(ports: MemoryPorts) -> None:
    doc = deploy(ports)
    ports.fleet.clear_allocations(doc["node"])  # Redis lost its data
    ports.fleet.allocate("2", "phantom", Demand(0.5, 100), ts=time.time() - 120)
    ports.fleet.allocate("2", "young", Demand(0.5, 100))  # placed after the registry was read
    assert allocations.run(ports) == {"added": 1, "freed": 1}
    assert doc["_id"] in ports.fleet.allocations(doc["node"])
    assert set(ports.fleet.allocations("2")) >= {"young"} and "phantom" not in ports.fleet.allocations("2")


def test_a_deployment_that_keeps_running_cut_off_moves_only_after_its_keep_for(ports: MemoryPorts) -> None:
    held, plain = running_on(ports, "1", 2)
    for doc in (held, plain):  # their node started them
        transition(ports, doc["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED], pid=100)
    ports.store.docs[held["_id"]]["keep_for"] = 30.0
    now = warm(ports)
    ports.fleet.no_presence = True  # a cut-off host: only its lease tells
    ports.fleet.nodes["1"].lease = False
    assert detect.run(ports, now)["failed_over"] == 1  # the plain one moves at once
    assert ports.store.get(plain["_id"])["node"] == "2"
    assert ports.store.get(held["_id"])["state"] == "running" and ports.store.get(held["_id"])["node"] == "1"
    assert replace.finish_fail_overs(ports, now + 29) == 0
    assert replace.finish_fail_overs(ports, now + 30.5) == 1
    moved = ports.store.get(held["_id"])
    assert (moved["node"], moved["generation"]) == ("2", 2)


def test_keep_for_does_not_hold_a_node_whose_process_died(ports: MemoryPorts) -> None:
    held = running_on(ports, "1", 1)[0]
    ports.store.docs[held["_id"]]["keep_for"] = 30.0
    ports.provider.gone.append("1")  # its agent exited: its children died with it
    assert detect.run(ports)["failed_over"] == 1
    assert ports.store.get(held["_id"])["node"] == "2"


def test_a_lost_deployment_is_left_to_its_fail_over_for_a_moment_then_placed_here(ports: MemoryPorts) -> None:
    doc = running_on(ports, "1", 1)[0]
    lost = transition(ports, doc["_id"], D.LOST, actor=Actor.CONTROL, expect=[D.SCHEDULED], reason="node-1 is dead")
    assert lost is not None
    assert replace.place_waiting(ports) == 0  # a fail-over placing it meanwhile would only race with this
    ports.store.docs[doc["_id"]]["updated_at"] -= replace.LOST_GRACE
    assert replace.place_waiting(ports) == 1
    assert ports.store.get(doc["_id"])["state"] == "scheduled"


def test_nodes_dead_in_one_pass_have_their_deployments_moved_together(ports: MemoryPorts) -> None:
    # Given two deployments on each of nodes 1 and 2, and two empty nodes
    on_1, on_2 = running_on(ports, "1"), running_on(ports, "2")
    ports.add_node("3")
    ports.add_node("4")
    now = warm(ports)
    writes: list[int] = []
    many = ports.store.compare_and_set_many
    ports.store.compare_and_set_many = lambda docs, *a, **kw: writes.append(len(docs)) or many(docs, *a, **kw)  # type: ignore[method-assign]
    # When nodes 1 and 2 lose their leases at once
    ports.fleet.nodes["1"].lease = ports.fleet.nodes["2"].lease = False
    ports.fleet.no_presence = True
    done = detect.run(ports, now)
    # Then one pass moves all four in one write that marks each lost (its own reason) and places it
    assert done["dead"] == ["1", "2"] and done["failed_over"] == 4
    assert writes == [4]
    for doc, node in [(d, "1") for d in on_1] + [(d, "2") for d in on_2]:
        moved = ports.store.get(doc["_id"])
        assert moved["state"] == "scheduled" and moved["node"] in ("3", "4") and moved["generation"] == 2
        history = ports.store.history(doc["_id"])
        lost, placed = history[-2:]
        assert (lost["state"], lost["node"], lost["generation"], lost["reason"]) == (
            "lost", node, 1, f"node-{node} lease expired",
        )  # fmt: skip
        assert (placed["state"], placed["node"], placed["generation"]) == ("scheduled", moved["node"], 2)
        assert [e["rev"] for e in history] == list(range(len(history)))  # one rev each, none skipped


def test_a_dead_nodes_deployments_that_find_no_room_are_lost_and_wait(ports: MemoryPorts) -> None:
    # Given three deployments on node 1 that no node, nor one added, has room for (their demand
    # raised since they were placed)
    on_1 = running_on(ports, "1", 3)
    for doc in on_1:
        ports.store.docs[doc["_id"]]["demand"] = {"cpu": 64.0, "memory": 64.0}
    now = warm(ports)
    writes: list[int] = []
    many = ports.store.compare_and_set_many
    ports.store.compare_and_set_many = lambda docs, *a, **kw: writes.append(len(docs)) or many(docs, *a, **kw)  # type: ignore[method-assign]
    # When node 1 loses its lease
    ports.fleet.nodes["1"].lease = False
    ports.fleet.no_presence = True
    done = detect.run(ports, now)
    # Then all three are lost in one write, then wait to be placed (pending: no room)
    assert done["dead"] == ["1"] and done["failed_over"] == 3
    assert writes[0] == 3
    for doc in on_1:
        assert ports.store.get(doc["_id"])["state"] == "pending"
        lost = [e for e in ports.store.history(doc["_id"]) if e["state"] == "lost"]
        assert [(e["node"], e["generation"], e["reason"]) for e in lost] == [("1", 1, "node-1 lease expired")]


def test_a_mover_holds_its_lock_between_batches_and_stops_when_another_took_it(ports: MemoryPorts) -> None:
    # Given 150 deployments on a big node 5, and an empty big node 6 (and the small 1 and 2)
    ports.add_node("5", cpus=64, memory=65536)
    on_5 = running_on(ports, "5", 150)
    ports.add_node("6", cpus=64, memory=65536)
    now = warm(ports)
    extended: list[str] = []

    def taken_over(name: str, token: str, seconds: float) -> bool:  # another mover took it meanwhile
        extended.append(name)
        ports.fleet.locks[name] = "another mover"
        return False

    ports.fleet.extend_lock = taken_over  # type: ignore[method-assign]
    # When node 5 dies, and its mover's lock is found taken before its second batch
    ports.fleet.nodes["5"].lease = False
    ports.fleet.no_presence = True
    done = detect.run(ports, now)
    # Then it placed its first batch, and left the rest to the one that holds the lock now
    assert extended == ["move:5"]
    states = [(d["state"], d["node"]) for d in (ports.store.get(x["_id"]) for x in on_5)]
    moved = [s for s in states if s[0] == "scheduled" and s[1] != "5"]  # on 6, or a few on 1 and 2
    assert len(moved) == deployer.PLACE_BATCH == done["failed_over"]
    assert states.count(("scheduled", "5")) == 150 - deployer.PLACE_BATCH  # as they were (not yet started)
    assert ports.fleet.locks["move:5"] == "another mover"  # not released by the one that lost it
