"""The relay: copies the events of deployments from their ``history`` into ``events``.

A transition writes its event in the same update as the new state (see
:mod:`dm.registry`), so the two cannot disagree and a transition costs one write. The
relay follows the deployments' change stream and inserts the events each change
carries into the ``events`` collection, which every reader of events uses (`dm events`,
the metrics exporter, the Kafka bridge). Its position in the stream (the resume token)
is saved in MongoDB after each batch, so a restart goes on where the last relay
stopped; with it, the newest ``created_at`` of a deployment it has seen (where `dm deployments`
starts reading newest first); (deployment_id, rev) is unique in ``events``, so an event copied twice is
stored once. The relay numbers the events it stores (``seq``, also their ``_id``:
increasing, in the registry's order) and saves the highest number with its position: every reader of
events (the publisher, `dm events -f`, the metrics) follows ``seq`` up to that saved
mark, so it never sees a batch half-written. With no position to resume from (the first start, or the server no longer
holds it in its oplog) it first copies every history entry that ``events`` lacks (a
catch-up scan), then follows.

The relay also keeps the number of deployments in each state (``counts``, saved with its
position), which `dm status` and the metrics show once counting them would cost (see
:func:`dm.status.deployment_counts`). Each event names the state it left (``from``), so an
event stored is +1 for its state and -1 for the one it left, whatever order they come in; an
event counts once, when the relay stores it (the unique index refuses it the second time).
The counts are saved in the same write as the mark, so they hold exactly the events numbered
up to it: a relay that starts counts the events stored above the mark (a relay that died
between a write and its save) before it goes on. A catch-up scan counts the deployments it reads
instead (so does a start with no counts saved: the first, or after an upgrade), and the
events it stores are in that count already. Retention takes what it deletes off the counts
(:mod:`dm.retention`).

One relay works at a time, the holder of a Redis lease; every control worker runs
one, and the others wait to take over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError
from redis.exceptions import RedisError

from dm import constants as c
from dm import keys as k
from dm.backoff import Backoff
from dm.control import Control
from dm.lease import Lease
from dm.registry import Doc

log = logging.getLogger("dm.relay")

#: events inserted in one write at most
BATCH = 500
#: milliseconds the server waits for a change before an empty answer: the longest an event
#: waits to be copied, and the idle pace of the loop
AWAIT_MS = 100
#: seconds the relay waits before reading again after an answer of fewer than GATHER_BELOW
#: changes: while they trickle in (a failover's reports, one per node), each read would bring
#: one or two (about 740 reads of the change stream during a failover of 500 on SecantusDB;
#: with the wait, about 90). Events are copied up to this much later; a flood (full answers)
#: is read without a pause.
GATHER = 0.05
GATHER_BELOW = 50
#: seconds between saves of the position while nothing happens
SAVE_EVERY = 10.0
#: deployments whose highest copied rev is remembered (to skip re-sent history cheaply)
REMEMBER = 50_000
#: only what the relay reads of each change (the server sends less)
PIPELINE = [{"$project": {"operationType": 1, "fullDocument.history": 1, "fullDocument.created_at": 1,
                          "updateDescription.updatedFields": 1}}]  # fmt: skip
#: the stream could not be resumed from the saved position (history lost, bad token)
RESUME_FAILED = {260, 280, 286}


def held_back(stream: Any) -> int | None:
    """How many changes ``stream`` holds from its last answer (0: the next ``try_next`` asks the
    server); None when this PyMongo does not show it (the cursor's ``_data``), and then the relay
    reads without pausing, as before."""
    data = getattr(getattr(stream, "_cursor", None), "_data", None)
    return len(data) if data is not None else None


def events_in(change: Doc) -> list[Doc]:
    """The history entries a change stream event carries (new ones, and for a rewritten
    array, old ones too: the unique index and the caller's memory drop those)."""
    kind = change.get("operationType")
    if kind in ("insert", "replace"):
        entries: Iterable[Any] = (change.get("fullDocument") or {}).get("history") or []
    elif kind == "update":
        entries = []
        for key, value in ((change.get("updateDescription") or {}).get("updatedFields") or {}).items():
            if key == "history" and isinstance(value, list):
                entries = [*entries, *value]
            elif key.startswith("history.") and isinstance(value, dict):
                entries = [*entries, value]
    else:
        return []
    # in rev order: a change may carry two moves (lost, then placed again: see
    # dm.lifecycle.transition_many), whatever order the server lists its fields in
    return sorted(
        (dict(e) for e in entries if isinstance(e, dict) and "deployment_id" in e and "rev" in e),
        key=lambda e: int(e["rev"]),
    )


def count_of(events: Iterable[Doc]) -> Counter[str] | None:
    """What stored events change in the count of deployments per state: +1 for the state each
    entered, -1 for the one it left; None when one names no state it left (recorded before
    events did): the counts must be made again from the deployments."""
    delta: Counter[str] = Counter()
    for e in events:
        if e.get("from") is None and int(e.get("rev") or 0) > 0:
            return None
        delta[str(e["state"])] += 1
        if e.get("from") is not None:
            delta[str(e["from"])] -= 1
    return delta


class Relay(threading.Thread):
    def __init__(self, ctl: Control, stop: threading.Event | None = None, lease_ttl: float = 5.0) -> None:
        super().__init__(name="dm-relay", daemon=True)
        self.ctl = ctl
        self.stop = stop or threading.Event()
        self.lease = Lease(ctl.redis, k.RELAY_LOCK, lease_ttl)
        self.meta = ctl.registry.db[c.META]
        self.copied: dict[str, int] = {}  # deployment id -> highest rev stored
        self.stored = 0  # events stored by this relay (for tests and logs)
        self.seq = 0  # the last number given to an event
        # the newest ``created_at`` of a deployment seen since the last save: saved with the
        # position (as a maximum), where `dm deployments` starts its newest-first windows
        self.newest: float | None = None
        # the counts per state: what the events stored since the last save change in them, or
        # (``tally``) the whole count a catch-up scan made, saved in place of the old one
        # (None: an event named no state it left, so the counts are made again)
        self.delta: Counter[str] | None = Counter()
        self.tally: Counter[str] | None = None

    def run(self) -> None:
        backoff = Backoff(0.5, 10.0)
        while not self.stop.is_set():
            try:
                if self.lease.hold():
                    self.follow()
                    backoff.reset()
                else:
                    self.stop.wait(self.lease.ttl / 3)
            except (PyMongoError, RedisError) as exc:
                delay = backoff.next()
                log.warning("relay: %s; trying again in %.1fs", exc, delay)
                self.stop.wait(delay)
            except Exception:  # a bug must not end the relay of every later event
                log.exception("relay: unexpected error; trying again")
                self.stop.wait(backoff.next())
        self.lease.release()

    def follow(self) -> None:
        """Copy events while this relay holds the lease."""
        deployments = self.ctl.registry.deployments
        saved = self.meta.find_one({"_id": "relay"}) or {}
        mark = int(saved.get("seq") or 0)
        # numbers go on from the highest stored (a relay that died after a write may not have saved it)
        self.seq = self.ctl.registry.highest_event()
        self.delta, self.tally = Counter(), None
        counted = isinstance(saved.get("counts"), dict)
        if counted and self.seq > mark:  # stored, but not yet in the saved counts
            delta = count_of(self.ctl.registry.events_between(mark, self.seq, {}))
            counted = delta is not None
            self.delta = delta or Counter()
        stream = None
        if saved.get("token") is not None:
            try:
                stream = deployments.watch(PIPELINE, resume_after=saved["token"], max_await_time_ms=AWAIT_MS)
                change = stream.try_next()  # a lost position shows here at the latest
            except OperationFailure as exc:
                if exc.code not in RESUME_FAILED:
                    raise
                log.warning("relay: cannot resume the change stream (%s); catching up from the deployments", exc)
                stream, change = None, None
        if stream is None or not counted:
            if stream is None:
                stream = deployments.watch(PIPELINE, max_await_time_ms=AWAIT_MS)  # opened first: nothing falls between
                change = None
            self.catch_up()
            self._save(stream.resume_token)
        last_save = time.monotonic()
        with stream:
            while not self.stop.is_set() and self.lease.hold():
                # changes come in batches of the server's; an empty answer waits up to AWAIT_MS
                rows = self.read(change) if change is not None else []
                got = 0  # changes of the server's last answer
                while len(rows) < BATCH:
                    change = stream.try_next()
                    if change is None:
                        break
                    rows += self.read(change)
                    got += 1
                    if held_back(stream) == 0:  # the next change is a read from the server
                        if got < GATHER_BELOW:  # changes trickle in: let them gather for one read
                            self.stop.wait(GATHER)
                        got = 0
                change = None
                if rows:
                    self.store(rows)
                if rows or time.monotonic() - last_save > SAVE_EVERY:
                    self._save(stream.resume_token)
                    last_save = time.monotonic()
                if self.delta is None:  # events without the state they left
                    log.warning("relay: events recorded before they named the state they left; counting again")
                    self.catch_up()
                    self._save(stream.resume_token)

    def read(self, change: Doc) -> list[Doc]:
        """The events of a change, noting when the deployment it inserted was created."""
        if change.get("operationType") in ("insert", "replace"):
            self.saw_created((change.get("fullDocument") or {}).get("created_at"))
        return events_in(change)

    def saw_created(self, created: Any) -> None:
        """Keep the newest ``created_at`` seen since the last save (a number, else ignored)."""
        if isinstance(created, (int, float)):
            self.newest = max(float(created), self.newest or float(created))

    def catch_up(self) -> None:
        """Copy every history entry of every deployment that ``events`` lacks, and count the
        deployments per state as read (the events it stores are in that count already; a
        change the stream brings after is counted only if not stored here)."""
        started, rows = time.monotonic(), []
        before = self.stored
        tally: Counter[str] = Counter()
        for doc in self.ctl.registry.deployments.find({}, {"history": 1, "created_at": 1, "state": 1}):
            self.saw_created(doc.get("created_at"))
            tally[str(doc.get("state"))] += 1
            rows += [dict(e) for e in doc.get("history") or [] if isinstance(e, dict) and "rev" in e]
            if len(rows) >= BATCH:
                self.store(rows, count=False)
                rows = []
        self.store(rows, count=False)
        self.tally, self.delta = tally, Counter()
        took = time.monotonic() - started
        log.info("relay: caught up from the deployments: %d event(s) copied, %d deployment(s) counted in %.1fs",
                 self.stored - before, tally.total(), took)  # fmt: skip

    def store(self, rows: list[Doc], count: bool = True) -> None:
        """Insert the events not stored yet, numbered; with ``count``, count those stored."""
        fresh = [r for r in rows if r["rev"] > self.copied.get(r["deployment_id"], -1)]
        if fresh:
            numbered = []
            for r in fresh:
                self.seq += 1
                numbered.append({**r, "_id": self.seq, "seq": self.seq})
            refused: set[int] = set()
            try:
                self.ctl.registry.events.insert_many(numbered, ordered=False)
            except BulkWriteError as exc:
                if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                    raise
                refused = {int(e["index"]) for e in exc.details.get("writeErrors", [])}
            self.stored += len(fresh) - len(refused)
            if count and self.delta is not None:
                delta = count_of(r for i, r in enumerate(numbered) if i not in refused)
                if delta is None:
                    self.delta = None  # counted again (see follow)
                else:
                    self.delta.update(delta)
        if len(self.copied) > REMEMBER:
            self.copied.clear()
        for r in fresh:
            self.copied[r["deployment_id"]] = max(r["rev"], self.copied.get(r["deployment_id"], -1))

    def _save(self, token: Any) -> None:
        """Save the position in the stream, and ``seq``: every event numbered up to it is stored;
        the counts per state (what the events up to ``seq`` changed in them, or a new count);
        and the newest creation seen (``newest_created``, kept as a maximum). One write: the
        counts and the mark cannot disagree."""
        sets: Doc = {"seq": self.seq, "at": time.time()}
        if token is not None:
            sets["token"] = token
        update: Doc = {"$set": sets}
        if self.delta is None:  # an event named no state it left: no counts to trust
            update["$unset"] = {"counts": ""}
        elif self.tally is not None:  # a new count
            sets["counts"] = {state: n for state, n in self.tally.items() if n}
        elif any(self.delta.values()):
            update["$inc"] = {f"counts.{state}": n for state, n in self.delta.items() if n}
        if self.newest is not None:
            update["$max"] = {"newest_created": self.newest}
        if "$inc" in update:  # onto the saved counts only (not onto none, as if they were all)
            if not self.meta.update_one({"_id": "relay", "counts": {"$exists": True}}, update).matched_count:
                log.warning("relay: the saved counts are gone; counting again")
                del update["$inc"]
                self.meta.update_one({"_id": "relay"}, update, upsert=True)
                self.delta = None
        else:
            self.meta.update_one({"_id": "relay"}, update, upsert=True)
        self.newest = None
        if self.delta is not None:
            self.tally, self.delta = None, Counter()


_relay: Relay | None = None


def start(ctl: Control) -> Relay:
    """Start this process's relay thread (once)."""
    global _relay
    if _relay is None or not _relay.is_alive():
        _relay = Relay(ctl)
        _relay.start()
    return _relay


def stop(timeout: float = 5.0) -> None:
    if _relay is not None:
        _relay.stop.set()
        _relay.join(timeout)
