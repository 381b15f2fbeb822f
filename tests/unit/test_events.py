"""The one event cursor (dm.registry.EventCursor) that `dm events -f`, the metrics and the
bridge's publisher read with, against the memory event log."""

from __future__ import annotations

from dm.adapters.memory import MemoryEventLog
from dm.registry import EventCursor


def log_of(states: list[tuple[str, str]]) -> MemoryEventLog:
    log = MemoryEventLog()
    for dep, state in states:
        log.store({"deployment_id": dep, "state": state})
    return log


def test_it_reads_each_event_once_in_order_up_to_the_mark() -> None:
    log = log_of([("a", "pending"), ("a", "scheduled"), ("b", "pending")])
    cursor = EventCursor(log)
    assert cursor.poll() == []  # nothing is stored up to the mark yet
    log.mark = 2
    assert [e["seq"] for e in cursor.poll()] == [1, 2]
    assert cursor.poll() == []
    log.mark = 3
    assert [e["seq"] for e in cursor.poll()] == [3]


def test_a_batch_being_written_is_never_seen_in_part() -> None:
    log = log_of([("a", "pending")])
    log.mark = 1
    cursor = EventCursor(log)
    cursor.poll()
    log.store({"deployment_id": "a", "state": "scheduled"})  # stored, but past the mark
    assert cursor.poll() == []


def test_a_query_skips_what_does_not_match_without_reading_it_again() -> None:
    log = log_of([("a", "pending"), ("b", "pending"), ("a", "scheduled")])
    log.mark = 3
    cursor = EventCursor(log, {"deployment_id": "a"})
    assert [e["state"] for e in cursor.poll()] == ["pending", "scheduled"]
    assert cursor.last == 3


def test_a_limit_pages_through_the_events() -> None:
    log = log_of([("a", str(i)) for i in range(5)])
    log.mark = 5
    cursor = EventCursor(log)
    pages = [[e["seq"] for e in cursor.poll(limit=2)] for _ in range(4)]
    assert pages == [[1, 2], [3, 4], [5], []]


def test_skip_marks_events_shown_before_following() -> None:
    log = log_of([("a", "pending"), ("a", "scheduled")])
    log.mark = 2
    cursor = EventCursor(log)
    cursor.skip([{"seq": 1}])
    assert [e["seq"] for e in cursor.poll()] == [2]


def test_the_relay_takes_a_change_of_two_moves_in_rev_order() -> None:
    from dm.relay import events_in

    lost = {"deployment_id": "a", "rev": 3, "state": "lost"}
    placed = {"deployment_id": "a", "rev": 4, "state": "scheduled"}
    fields = {"state": "scheduled", "history.4": placed, "history.3": lost, "rev": 4}  # as a server may list them
    change = {"operationType": "update", "updateDescription": {"updatedFields": fields}}
    assert [e["state"] for e in events_in(change)] == ["lost", "scheduled"]
    whole = {"operationType": "update", "updateDescription": {"updatedFields": {"history": [placed, lost]}}}
    assert [e["rev"] for e in events_in(whole)] == [3, 4]


def test_the_counts_of_events_are_the_net_move_whatever_order_they_come_in() -> None:
    from dm.adapters.memory import MemoryStore
    from dm.lifecycle import new_deployment
    from dm.models import DeployRequest
    from dm.relay import count_of

    algorithm = {"name": "a", "version": "1", "sha256": "0" * 64,
                 "spec": {"command": ["x"], "demand": {"cpu": 0.1, "memory": 1.0}, "restart": {}}}  # fmt: skip
    store = MemoryStore()
    doc = new_deployment(DeployRequest(algorithm="a"), algorithm, node="1")  # pending, then scheduled
    assert [(e["from"], e["state"]) for e in doc["history"]] == [(None, "pending"), ("pending", "scheduled")]
    store.create(doc)
    store.compare_and_set_many([store.find(doc["_id"])], "scheduled", reason="moved", fields={},
                               each=[{"node": "2"}], new_generation=True, via="lost")  # fmt: skip
    events = store.events
    assert [(e["from"], e["state"]) for e in events[2:]] == [("scheduled", "lost"), ("lost", "scheduled")]
    assert {s: n for s, n in count_of(events).items() if n} == {"scheduled": 1}
    assert {s: n for s, n in count_of(reversed(events)).items() if n} == {"scheduled": 1}
    assert {s: n for s, n in count_of(events[2:]).items() if n} == {}  # moved off and back: no change
    # an event recorded before events named the state they left: the counts must be made again
    assert count_of([{**events[1], "from": None}]) is None
    assert count_of([{k: v for k, v in events[0].items() if k != "from"}]) is not None  # the first left none
