"""The relay copies each transition's event from the deployment into ``events``: each once,
in order, across restarts of the relay, and from the documents when it has no position."""

from __future__ import annotations

from dm.lifecycle import Actor, transition
from dm.models import DeployRequest
from dm.relay import Relay
from tests.system import System, wait_for


def record(system: System, count: int) -> list[str]:
    algorithm = system.ctl.registry.get_algorithm("hello")
    return [
        system.ctl.registry.create_deployment(DeployRequest(algorithm="hello"), algorithm)[0]["_id"]
        for _ in range(count)
    ]


def walk(system: System, dep_id: str) -> None:
    """pending -> scheduled -> running -> succeeded, each a compare-and-set with its event."""
    ports = system.ctl.ports
    assert transition(ports, dep_id, "scheduled", actor=Actor.CONTROL, expect=["pending"], node="1", reason="placed")
    assert transition(ports, dep_id, "running", actor=Actor.NODE, expect=["scheduled"], generation=1, pid=1,
                      reason="started")  # fmt: skip
    assert transition(ports, dep_id, "succeeded", actor=Actor.NODE, expect=["running"], generation=1, exit_code=0,
                      reason="exit 0")  # fmt: skip


def events(system: System) -> list[tuple[str, int, str]]:
    return sorted((e["deployment_id"], e["rev"], e["state"]) for e in system.ctl.registry.events.find({}))


def expected(ids: list[str]) -> list[tuple[str, int, str]]:
    return sorted(
        (d, rev, state) for d in ids for rev, state in enumerate(["pending", "scheduled", "running", "succeeded"])
    )


def start(system: System) -> Relay:
    relay = Relay(system.ctl, lease_ttl=2.0)
    relay.start()
    return relay


def stop(relay: Relay) -> None:
    relay.stop.set()
    relay.join(10)
    assert not relay.is_alive()


def test_each_transition_reaches_events_once_in_order_and_a_restarted_relay_resumes(make_system):
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    relay = start(system)
    try:
        first = record(system, 20)
        for dep_id in first:
            walk(system, dep_id)
        wait_for(lambda: events(system) == expected(first), 30, what="every event of the first 20 copied")
        # a deployment's own events are readable at once, without waiting for the relay
        assert [e["state"] for e in system.ctl.registry.list_events(first[0])] == [
            "pending", "scheduled", "running", "succeeded"
        ]  # fmt: skip
    finally:
        stop(relay)
    # while no relay runs, more transitions happen; the next relay resumes from the saved position
    second = record(system, 20)
    for dep_id in second:
        walk(system, dep_id)
    assert events(system) == expected(first), "nothing is copied while no relay runs"
    relay = start(system)
    try:
        wait_for(lambda: events(system) == expected(first + second), 30, what="the rest copied after the restart")
        by_time = [e["rev"] for e in system.ctl.registry.events.find({"deployment_id": second[0]}).sort("time", 1)]
        assert by_time == [0, 1, 2, 3]
    finally:
        stop(relay)


def test_without_a_saved_position_the_relay_catches_up_from_the_deployments(make_system):
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    ids = record(system, 30)
    for dep_id in ids[:10]:
        walk(system, dep_id)
    # an events collection that lost some events, and no saved position (as after the oplog moved on)
    system.ctl.registry.db["meta"].delete_many({})
    relay = start(system)
    try:
        pending_only = [(d, 0, "pending") for d in ids[10:]]
        wait_for(lambda: events(system) == sorted(expected(ids[:10]) + pending_only), 30, what="the catch-up")
        for dep_id in ids[10:]:  # and it follows from there
            walk(system, dep_id)
        wait_for(lambda: events(system) == expected(ids), 30, what="the changes after the catch-up")
    finally:
        stop(relay)


def test_only_one_relay_copies_at_a_time_and_another_takes_over(make_system):
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    one, two = start(system), start(system)
    try:
        ids = record(system, 10)
        wait_for(lambda: len(events(system)) == 10, 30, what="the pending events")
        assert [one.lease.held, two.lease.held].count(True) == 1, "exactly one relay holds the lease"
        holder = one if one.lease.held else two
        stop(holder)  # releases the lease: the other takes over
        for dep_id in ids:
            walk(system, dep_id)
        wait_for(lambda: events(system) == expected(ids), 30, what="the other relay to take over")
    finally:
        for relay in (one, two):
            stop(relay)
