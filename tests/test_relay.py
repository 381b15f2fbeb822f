"""The relay copies each transition's event from the deployment into ``events``: each once,
in order, across restarts of the relay, and from the documents when it has no position."""

from __future__ import annotations

import time

import pytest

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


def test_changes_that_trickle_in_are_read_in_few_answers_and_all_copied(make_system):
    """One change every 10 ms (a failover's reports, one per node): the relay waits a moment
    after a short answer, so the registry answers far fewer reads than there are changes."""
    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    ids = record(system, 60)
    relay = start(system)
    try:
        wait_for(lambda: len(events(system)) == 60, 30, what="the pending events copied")
        before = system.ctl.registry.db.command("serverStatus")["opcounters"]["getmore"]
        ports = system.ctl.ports
        for dep_id in ids:
            assert transition(ports, dep_id, "scheduled", actor=Actor.CONTROL, expect=["pending"], node="1",
                              reason="placed")  # fmt: skip
            time.sleep(0.01)  # the pace of the changes, not a wait for a result
        wait_for(lambda: len(events(system)) == 120, 30, what="every scheduled event copied")
        reads = system.ctl.registry.db.command("serverStatus")["opcounters"]["getmore"] - before
        assert reads < 30, f"{reads} reads of the change stream for 60 changes"
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


def by_index(system: System) -> dict[str, int]:
    return dict(sorted(system.ctl.registry.count_by_state().items()))


def by_relay(system: System) -> dict[str, int] | None:
    counts = system.ctl.registry.relay_counts()
    return None if counts is None else dict(sorted((s, n) for s, n in counts.items() if n))


def counts_agree(system: System, what: str) -> None:
    wait_for(lambda: by_relay(system) == by_index(system), 30, what=f"the relay's counts to match ({what})")


class DiesAfterAWrite(Relay):
    """A relay that dies between storing a batch of events and saving its mark with the counts."""

    def store(self, rows, count=True):
        super().store(rows, count)
        if count and rows:
            raise SystemExit  # ends the thread, lease held, nothing saved


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the relay made to die
def test_the_relays_counts_per_state_match_the_registry_through_crashes_catch_ups_and_retention(
    make_system, monkeypatch
):
    from threading import Thread

    from dm import retention, status

    system = make_system(nodes=0, control=False, beat=False)
    system.add_examples("hello")
    ids = record(system, 30)
    relay = start(system)
    try:
        for dep_id in ids[:10]:
            walk(system, dep_id)
        for dep_id in ids[10:20]:
            assert transition(system.ctl.ports, dep_id, "scheduled", actor=Actor.CONTROL, expect=["pending"],
                              node="1", reason="placed")  # fmt: skip
        counts_agree(system, "following")
        assert by_index(system) == {"pending": 10, "scheduled": 10, "succeeded": 10}
        # past the exact count's size, dm status shows the relay's counts, and says so
        monkeypatch.setattr(status, "COUNT_EXACT_UPTO", 5)
        assert status.counted(system.ctl) == (by_index(system), "relay")
        monkeypatch.setattr(status, "COUNT_EXACT_UPTO", 5000)
        assert status.counted(system.ctl) == (by_index(system), "index")
    finally:
        stop(relay)

    # a relay that stored events and died before it saved them in the counts: the next counts them
    dying = DiesAfterAWrite(system.ctl, lease_ttl=2.0)
    dying.start()
    for dep_id in ids[10:15]:
        assert transition(system.ctl.ports, dep_id, "running", actor=Actor.NODE, expect=["scheduled"], generation=1,
                          pid=1, reason="started")  # fmt: skip
    dying.join(30)
    assert not dying.is_alive() and dying.stored > 0, "the relay stored events, then died"
    mark = system.ctl.registry.events_mark()
    assert system.ctl.registry.highest_event() > mark, "events stored past the saved mark"
    relay = start(system)
    try:
        counts_agree(system, "after a relay died between a write and its save")
        assert by_index(system)["running"] == 5
        # retention deletes finished deployments: they leave the counts
        deleted, _ = retention.prune_deployments(system.ctl.registry, time.time() + 1)
        assert deleted == 10
        counts_agree(system, "after retention")
        assert "succeeded" not in by_index(system)
    finally:
        stop(relay)

    # no saved position: the catch-up counts the deployments, while transitions go on meanwhile
    system.ctl.registry.db["meta"].delete_many({})
    mover = Thread(target=lambda: [walk(system, dep_id) for dep_id in ids[20:30]])
    relay = start(system)
    mover.start()
    try:
        mover.join(60)
        counts_agree(system, "after a catch-up with transitions during it")
        assert by_index(system) == {"running": 5, "scheduled": 5, "succeeded": 10}
    finally:
        stop(relay)

    # events recorded before events named the state they left (an older dm): counted again
    last = ids[10]
    assert transition(system.ctl.ports, last, "stopping", actor=Actor.CONTROL, expect=["running"], reason="stop")
    system.ctl.registry.deployments.update_one({"_id": last}, {"$unset": {"history.$[].from": ""}})
    relay = start(system)
    try:
        counts_agree(system, "after events without the state they left")
        assert by_index(system)["stopping"] == 1
    finally:
        stop(relay)
