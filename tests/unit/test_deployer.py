"""The deploy path against the memory ports: placement, idempotence, room, stop."""

from __future__ import annotations

import re

import pytest

from dm import deployer
from dm.adapters.memory import MemoryPorts
from dm.errors import InvalidArgs, NoCapacity, UnknownAlgorithm
from dm.models import DeployRequest


def deploy(ports: MemoryPorts, name: str = "hello", request_id: str | None = None, **args: object) -> dict:
    return deployer.deploy(ports, DeployRequest(algorithm=name, args=dict(args), request_id=request_id))


def test_a_deployment_goes_to_the_least_loaded_node(ports: MemoryPorts) -> None:
    ports.fleet.nodes["1"].cpu, ports.fleet.nodes["1"].ram = 50.0, 50.0
    doc = deploy(ports)
    assert (doc["state"], doc["node"], doc["generation"]) == ("scheduled", "2", 1)
    assert ports.dispatcher.runs() == [(doc["_id"], "2", 1)]
    assert [e["state"] for e in ports.store.history(doc["_id"])] == ["pending", "scheduled"]


def test_the_same_request_twice_makes_one_deployment(ports: MemoryPorts) -> None:
    first = deploy(ports, request_id="job-1")
    again = deploy(ports, request_id="job-1")
    assert again["_id"] == first["_id"] and len(ports.store.docs) == 1
    assert len(ports.dispatcher.runs()) == 1


def test_a_burst_is_spread_by_reservations_and_never_passes_the_threshold(ports: MemoryPorts) -> None:
    docs = [deploy(ports, "big") for _ in range(3)]
    nodes = [d["node"] for d in docs]
    # 0.5 cpu each on 1-cpu nodes under 80%: one per node, then a new node
    assert nodes[:2] == ["1", "2"] or nodes[:2] == ["2", "1"]
    assert docs[2]["node"] == "3" and ports.provider.started == ["3"]


def test_no_room_and_no_node_to_add_waits_pending_with_the_reason(ports: MemoryPorts) -> None:
    ports.provider.starts_nodes = False
    deploy(ports, "big")
    deploy(ports, "big")
    waiting = deploy(ports, "big")
    assert waiting["state"] == "pending" and "waiting for room" in waiting["reason"]
    assert ports.dispatcher.runs()[-1][0] != waiting["_id"]


def test_at_max_nodes_nothing_is_added(ports: MemoryPorts) -> None:
    ports.settings = ports.settings.with_(max_nodes=2)
    ports.provider.settings = ports.settings
    for _ in range(2):
        deploy(ports, "big")
    waiting = deploy(ports, "big")
    assert waiting["state"] == "pending" and ports.provider.started == []
    assert "max_nodes=2" in waiting["reason"]


def test_a_demand_no_node_can_hold_is_refused_naming_the_node_size(ports: MemoryPorts) -> None:
    ports.catalogue.add("huge", cpu=64, memory=512)
    with pytest.raises(NoCapacity, match=r"64 cpu.*largest node has 1 cpu and 1024 MiB"):
        deploy(ports, "huge")
    assert ports.store.docs == {} and ports.provider.started == []


def test_an_unknown_algorithm_is_refused(ports: MemoryPorts) -> None:
    with pytest.raises(UnknownAlgorithm):
        deploy(ports, "nope")


def test_args_the_algorithm_does_not_allow_are_refused(ports: MemoryPorts) -> None:
    ports.catalogue.add("strict", args=["who"])
    with pytest.raises(InvalidArgs):
        deploy(ports, "strict", what=1)
    assert ports.store.docs == {}


def test_stopping_a_waiting_deployment_stops_it_at_once(ports: MemoryPorts) -> None:
    ports.provider.starts_nodes = False
    for _ in range(2):
        deploy(ports, "big")
    waiting = deploy(ports, "big")
    stopped = deployer.stop(ports, waiting["_id"])
    assert stopped["state"] == "stopped" and not any(o[0] == "kill" for o in ports.dispatcher.orders)


def test_stopping_a_placed_deployment_goes_through_its_node(ports: MemoryPorts) -> None:
    doc = deploy(ports)
    stopping = deployer.stop(ports, doc["_id"], "stopped by request")
    assert stopping["state"] == "stopping"
    assert ports.dispatcher.orders[-1] == ("kill", doc["_id"], doc["node"], 1)
    assert deployer.stop(ports, doc["_id"])["state"] == "stopping"  # a second stop changes nothing


def test_placing_a_deployment_that_is_not_waiting_changes_nothing(ports: MemoryPorts) -> None:
    doc = deploy(ports)
    assert deployer.place(ports, doc["_id"])["rev"] == doc["rev"]


def test_public_shows_plain_values(ports: MemoryPorts) -> None:
    shown = deployer.public(deploy(ports))
    assert type(shown["state"]) is str and shown["id"]


def test_a_provider_that_starts_no_nodes_lets_a_big_demand_wait_for_a_bigger_node(ports: MemoryPorts) -> None:
    ports.provider.starts_nodes = False
    ports.catalogue.add("huge", cpu=3, memory=512)
    waiting = deploy(ports, "huge")
    assert waiting["state"] == "pending"
    ports.add_node("9", cpus=8, memory=4096)  # started by hand
    assert deployer.place(ports, waiting["_id"])["node"] == "9"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"n": 18446744073709551616}, "64-bit"),
        ({"a\x00b": 1}, "NUL"),
        ({"$where": 1}, "$"),
        ({"blob": "x" * 70_000}, "DM_ARGS"),
    ],
)
def test_args_the_registry_cannot_store_or_the_environment_cannot_carry_are_refused(
    ports: MemoryPorts, args: dict, says: str
) -> None:
    with pytest.raises(InvalidArgs, match=re.escape(says)):
        deployer.deploy(ports, DeployRequest(algorithm="hello", args=args))
    assert ports.store.docs == {}


def pending(ports: MemoryPorts, name: str, count: int) -> list[dict]:
    """Deployments recorded ``pending`` (as a backlog, or a dead node's once ``lost``)."""
    from dm.lifecycle import new_deployment

    algorithm = ports.catalogue.algorithm(name)
    return [ports.store.create(new_deployment(DeployRequest(algorithm=name), algorithm))[0] for _ in range(count)]


def test_a_batch_is_placed_as_one_by_one_would_and_never_past_the_threshold(ports: MemoryPorts) -> None:
    # Given three waiting deployments of 0.5 cpu, two 1-cpu nodes (80%: one each) and no node to add
    ports.provider.starts_nodes = False
    docs = pending(ports, "big", 3)
    # When they are placed as a batch
    placed = deployer.place_many(ports, docs)
    # Then one lands on each node in a new generation, with its run order; the third waits
    assert [d["state"] for d in placed] == ["scheduled", "scheduled", "pending"]
    assert sorted(d["node"] for d in placed[:2]) == ["1", "2"] and all(d["generation"] == 1 for d in placed[:2])
    assert "waiting for room" in placed[2]["reason"]
    assert sorted(ports.dispatcher.runs()) == sorted((d["_id"], d["node"], 1) for d in placed[:2])
    assert {n: set(ports.fleet.allocations(n)) for n in ("1", "2")} == {d["node"]: {d["_id"]} for d in placed[:2]}
    assert [e["state"] for e in ports.store.history(placed[0]["_id"])] == ["pending", "scheduled"]
    assert placed[0]["reason"].startswith(f"placed on node-{placed[0]['node']} (load ")
    assert "placement" not in ports.fleet.locks  # the lock was released


def test_a_deployment_that_moved_on_meanwhile_keeps_no_allocation_from_a_batch(ports: MemoryPorts) -> None:
    docs = pending(ports, "hello", 3)
    deployer.stop(ports, docs[1]["_id"])  # stopped after the batch was read
    placed = deployer.place_many(ports, docs)
    assert [d["state"] for d in placed] == ["scheduled", "stopped", "scheduled"]
    held = {dep for n in ("1", "2") for dep in ports.fleet.allocations(n)}
    assert held == {docs[0]["_id"], docs[2]["_id"]}
    assert docs[1]["_id"] not in {dep for dep, _, _ in ports.dispatcher.runs()}


def test_a_batch_that_places_must_name_each_node(ports: MemoryPorts) -> None:
    from dm.lifecycle import Actor, IllegalTransition, transition_many

    docs = pending(ports, "hello", 2)
    with pytest.raises(IllegalTransition, match="names each deployment's node"):
        transition_many(ports, docs, "scheduled", actor=Actor.CONTROL, reason="placed")
