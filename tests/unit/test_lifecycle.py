"""The transition table and the one writer of a deployment's state."""

from __future__ import annotations

import pytest

from dm.adapters.memory import MemoryPorts
from dm.lifecycle import (
    ACTIVE,
    FINAL,
    TABLE,
    Actor,
    D,
    Effect,
    IllegalTransition,
    NodeState,
    new_deployment,
    rule,
    set_node_state,
    transition,
    transition_many,
)
from dm.models import Demand, DeployRequest


def record(ports: MemoryPorts, name: str = "hello", node: str | None = None) -> dict:
    doc = new_deployment(DeployRequest(algorithm=name), ports.catalogue.algorithm(name), node=node, reason="placed")
    return ports.store.create(doc)[0]


def test_no_move_leaves_a_final_state() -> None:
    assert not [(frm, to) for frm, to in TABLE if frm in FINAL]


def test_every_state_is_reachable_from_pending() -> None:
    seen, todo = {D.PENDING}, [D.PENDING]
    while todo:
        frm = todo.pop()
        for f, to in TABLE:
            if f == frm and to not in seen:
                seen.add(to)
                todo.append(to)
    assert seen == set(D)


def test_every_move_out_of_an_active_state_to_an_inactive_one_frees_the_allocation() -> None:
    for (frm, to), r in TABLE.items():
        if frm in (*ACTIVE, D.STOPPING) and to not in ACTIVE and to != D.STOPPING:
            assert Effect.RELEASE in r.effects, (frm, to)
        if Effect.RELEASE in r.effects:
            assert frm in (*ACTIVE, D.STOPPING), (frm, to)


def test_only_a_placement_starts_a_new_generation_and_sends_a_run_order() -> None:
    for (frm, to), r in TABLE.items():
        assert r.new_generation == (to == D.SCHEDULED), (frm, to)
        assert (Effect.RUN in r.effects) == (to == D.SCHEDULED), (frm, to)


def test_a_stop_of_a_deployment_on_a_node_sends_a_kill_order() -> None:
    for frm in ACTIVE:
        assert Effect.KILL in rule(frm, D.STOPPING, Actor.CONTROL).effects


@pytest.mark.parametrize(
    ("frm", "to", "actor"),
    [
        (D.PENDING, D.SCHEDULED, Actor.NODE),  # only the control plane places
        (D.SCHEDULED, D.RUNNING, Actor.CONTROL),  # only the node says it runs
        (D.SUCCEEDED, D.RUNNING, Actor.NODE),
        (D.STOPPED, D.PENDING, Actor.CONTROL),
        (D.RUNNING, D.SCHEDULED, Actor.CONTROL),  # a running copy must be lost before it moves
        (D.RUNNING, D.RUNNING, Actor.NODE),
    ],
)
def test_moves_the_table_does_not_allow_are_refused(frm: D, to: D, actor: Actor) -> None:
    with pytest.raises(IllegalTransition, match=f"from {frm} to {to}"):
        rule(frm, to, actor)


def test_a_move_is_one_write_with_its_event(ports: MemoryPorts) -> None:
    doc = record(ports, node="1")
    moved = transition(ports, doc["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED], generation=1,
                       reason="started", pid=42)  # fmt: skip
    assert moved is not None
    assert (moved["state"], moved["rev"], moved["pid"], moved["generation"]) == ("running", 2, 42, 1)
    assert [(e["state"], e["rev"]) for e in ports.store.history(doc["_id"])] == [
        ("pending", 0), ("scheduled", 1), ("running", 2)
    ]  # fmt: skip


def test_a_move_from_a_state_it_is_not_in_is_refused_and_writes_nothing(ports: MemoryPorts) -> None:
    doc = record(ports)
    assert transition(ports, doc["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED]) is None
    assert ports.store.get(doc["_id"])["rev"] == 0 and len(ports.store.history(doc["_id"])) == 1


def test_a_report_of_an_old_generation_is_refused(ports: MemoryPorts) -> None:
    doc = record(ports, node="1")
    assert transition(ports, doc["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED], generation=0) is None
    assert ports.store.get(doc["_id"])["state"] == "scheduled"


def test_a_stale_current_document_is_decided_again_on_the_stored_one(ports: MemoryPorts) -> None:
    doc = record(ports, node="1")
    stale = dict(doc)
    transition(ports, doc["_id"], D.STOPPING, actor=Actor.CONTROL, expect=ACTIVE, reason="stop")
    assert transition(ports, doc["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED], current=stale) is None


def test_placement_starts_a_new_generation_records_the_allocation_and_sends_the_order(ports: MemoryPorts) -> None:
    doc = record(ports)
    placed = transition(ports, doc["_id"], D.SCHEDULED, actor=Actor.CONTROL, expect=[D.PENDING], node="2",
                        run={"demand": Demand(0.1, 64), "lock": None})  # fmt: skip
    assert placed is not None and placed["generation"] == 1
    assert doc["_id"] in ports.fleet.allocations("2")
    assert ports.dispatcher.runs() == [(doc["_id"], "2", 1)]


def test_leaving_an_active_state_frees_the_allocation_on_the_node_it_held(ports: MemoryPorts) -> None:
    doc = record(ports, node="1")
    ports.fleet.allocate("1", doc["_id"], Demand(0.1, 64))
    transition(ports, doc["_id"], D.LOST, actor=Actor.CONTROL, expect=ACTIVE, reason="node-1 lease expired")
    assert ports.fleet.allocations("1") == {}


def test_a_stop_sends_a_kill_order_to_the_node(ports: MemoryPorts) -> None:
    doc = record(ports, node="1")
    transition(ports, doc["_id"], D.STOPPING, actor=Actor.CONTROL, expect=ACTIVE, reason="stop")
    assert ports.dispatcher.orders[-1] == ("kill", doc["_id"], "1", 1)


def test_an_outage_in_an_effect_leaves_the_move_standing(ports: MemoryPorts, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = record(ports, node="1")

    def away(*_: object) -> None:
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(ports.fleet, "release", away)
    moved = transition(ports, doc["_id"], D.LOST, actor=Actor.CONTROL, expect=ACTIVE, reason="lost")
    assert moved is not None and ports.store.get(doc["_id"])["state"] == "lost"


def test_an_error_in_an_effect_that_is_no_outage_is_raised(ports: MemoryPorts, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = record(ports, node="1")

    def broken(*_: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(ports.fleet, "release", broken)
    with pytest.raises(ValueError):
        transition(ports, doc["_id"], D.LOST, actor=Actor.CONTROL, expect=ACTIVE, reason="lost")


def test_an_outage_of_the_store_is_raised_to_the_caller(ports: MemoryPorts) -> None:
    doc = record(ports, node="1")
    ports.store.fail_with = ConnectionError("MongoDB is away")
    with pytest.raises(ConnectionError):
        transition(ports, doc["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED])


def test_a_node_state_is_written_to_the_registry_first_and_copied_to_the_fleet(ports: MemoryPorts) -> None:
    assert set_node_state(ports, "1", NodeState.DEAD, expect=("up", "starting"))
    assert ports.nodes.get_node("1")["state"] == "dead" and ports.fleet.nodes["1"].state == "dead"
    # a second checker loses the compare-and-set
    assert not set_node_state(ports, "1", NodeState.DEAD, expect=("up", "starting"))


def test_states_keep_their_stored_values() -> None:
    assert [s.value for s in D] == [
        "pending", "scheduled", "running", "restarting", "lost", "stopping", "stopped", "succeeded", "failed"
    ]  # fmt: skip
    assert D.RUNNING == "running" and f"{NodeState.UP}" == "up"


def test_a_batch_move_moves_those_still_as_read_each_with_its_event(ports: MemoryPorts) -> None:
    docs = [record(ports, node="1") for _ in range(3)]
    transition(ports, docs[1]["_id"], D.RUNNING, actor=Actor.NODE, expect=[D.SCHEDULED])  # moved on since read
    moved = transition_many(ports, docs, D.LOST, actor=Actor.CONTROL, reason="node-1 lease expired")
    assert sorted(d["_id"] for d in moved) == sorted([docs[0]["_id"], docs[2]["_id"]])
    assert ports.store.get(docs[1]["_id"])["state"] == "running"
    assert [e["state"] for e in ports.store.history(docs[0]["_id"])][-1] == "lost"


def test_a_batch_move_is_held_to_the_table(ports: MemoryPorts) -> None:
    docs = [record(ports, node="1")]
    with pytest.raises(IllegalTransition):
        transition_many(ports, docs, D.SUCCEEDED, actor=Actor.CONTROL, reason="no")
    with pytest.raises(IllegalTransition):
        transition_many(ports, docs, D.SCHEDULED, actor=Actor.CONTROL, reason="a batch never places")
