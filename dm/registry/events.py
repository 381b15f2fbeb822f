"""Events: the numbered copies the relay makes of every transition (``events``), the mark up
to which all are stored, and the one cursor every reader follows (`dm events -f`, the metrics,
the bridge's publisher)."""

from __future__ import annotations

import time
from typing import Any

from dm import constants as c
from dm.ports import EventLog
from dm.registry.base import IN_CHUNK, Collections

Doc = dict[str, Any]

#: event numbers looked up in one query (see Registry.events_between)
EVENT_SPAN = 2000


class EventCursor:
    """Reads the events collection incrementally, in the relay's order, each event once.

    By ``seq`` (also the ``_id``), the number the relay gives each event it stores, and only
    up to the mark it saves after each batch, so a batch being written is never seen in part.
    """

    def __init__(self, registry: EventLog, query: Doc | None = None) -> None:
        self.registry = registry
        self.query = dict(query or {})
        self.last = 0  # seq of the newest event read

    def skip(self, events: list[Doc]) -> None:
        """Mark events as read (e.g. the ones shown before following)."""
        for event in events:
            self.last = max(self.last, int(event.get("seq") or 0))

    def poll(self, limit: int = 0) -> list[Doc]:
        mark = self.registry.events_mark()
        if mark <= self.last:
            return []
        upto = min(mark, self.last + EVENT_SPAN)  # a span at a time: the numbers are looked up
        new = self.registry.events_between(self.last, upto, self.query, limit)
        if new:
            self.skip(new)
        if not limit or len(new) < limit:
            self.last = upto  # nothing else up to there matches the query
        return new


class Events(Collections):
    def list_events(self, deployment_id: str | None = None, limit: int = 50) -> list[Doc]:
        """The last ``limit`` events; one deployment's in ``rev`` order, all in the relay's order.

        Not by ``_id`` or time: clocks of processes and hosts differ; ``seq`` is the relay's.
        """
        if deployment_id:
            # the deployment's own history is current (the relay copies it a moment later);
            # the events collection has what is older than the history keeps
            doc = self.deployments.find_one({"_id": deployment_id}, {"history": 1})
            history = list((doc or {}).get("history") or [])
            first = history[0]["rev"] if history else None
            if first is not None and (first == 0 or len(history) >= limit):
                return history[-limit:] if limit else history
            query: Doc = {"deployment_id": deployment_id}
            if first is not None:
                query["rev"] = {"$lt": first}
            older = list(self.events.find(query).sort("rev", -1).limit(max(limit - len(history), 0)))
            older.reverse()
            rows = [*older, *history]
            return rows[-limit:] if limit else rows
        return self.last_events(limit)

    def events_between(self, after: int, upto: int, query: Doc, limit: int = 0) -> list[Doc]:
        """Events numbered in (after, upto] that match ``query``, in the relay's order.

        The numbers are looked up (``$in``), not read as an ``_id`` range: SecantusDB scans
        the collection for a range (255 ms for 1,000 of 20,000 events), and a long ``$in`` costs
        it more than linearly (1,000 numbers 667 ms, 2,000 2.6 s), so they go :data:`IN_CHUNK`
        at a time (1,000 events in 70 ms). Callers keep a span to :data:`EVENT_SPAN` numbers."""
        rows: list[Doc] = []
        for low in range(after, upto, IN_CHUNK):
            ids = list(range(low + 1, min(low + IN_CHUNK, upto) + 1))
            rows += sorted(self.events.find({**query, "_id": {"$in": ids}}), key=lambda e: e["_id"])
            if limit and len(rows) >= limit:
                break
        return rows[:limit] if limit else rows

    def last_events(self, limit: int) -> list[Doc]:
        """The last ``limit`` events up to the relay's mark, oldest first (numbers looked up;
        they may have gaps, so the span widens until it holds enough)."""
        mark = self.events_mark()
        span = limit
        while mark > 0 and limit > 0:
            low = max(0, mark - span)
            rows = self.events_between(low, mark, {})
            if len(rows) >= limit or low == 0:
                return rows[-limit:]
            span *= 4
        return []

    def highest_event(self) -> int:
        """The highest number stored: at the mark, or past it when a relay died between a write
        and saving the mark (looked up a span at a time above the mark)."""
        seq = self.events_mark()
        while True:
            ids = list(range(seq + 1, seq + IN_CHUNK + 1))
            found = [e["_id"] for e in self.events.find({"_id": {"$in": ids}}, {"_id": 1})]
            if not found:
                return seq
            seq = max(int(i) for i in found)

    def newest_created(self, fresh: float = 60.0) -> float | None:
        """The newest ``created_at`` of a deployment the relay has seen, if it saved its position
        in the last ``fresh`` seconds (a relay that follows saves it every few seconds; one that
        stopped knows nothing of what was made since). None when unknown."""
        newest = self._relay_saved("newest_created", fresh)
        return float(newest) if isinstance(newest, (int, float)) else None

    def relay_counts(self, fresh: float = 60.0) -> dict[str, int] | None:
        """Deployments per state as the relay counted them, up to its mark, if it saved them in
        the last ``fresh`` seconds (see :mod:`dm.relay`). None when unknown."""
        counts = self._relay_saved("counts", fresh)
        if not isinstance(counts, dict) or any(not isinstance(n, int) or n < 0 for n in counts.values()):
            return None
        return {str(state): int(n) for state, n in counts.items()}

    def uncount(self, state: str, n: int) -> None:
        """Take ``n`` deleted deployments in ``state`` off the relay's counts, if it keeps them
        (none are made up where it has none: it counts them all anew then)."""
        self.db[c.META].update_one({"_id": "relay", "counts": {"$exists": True}}, {"$inc": {f"counts.{state}": -n}})

    def _relay_saved(self, field: str, fresh: float) -> Any:
        meta = self.db[c.META].find_one({"_id": "relay"}, {field: 1, "at": 1}) or {}
        at = meta.get("at")
        return meta.get(field) if isinstance(at, (int, float)) and time.time() - at <= fresh else None

    def events_mark(self) -> int:
        """The relay's mark: every event numbered up to it is stored (see :mod:`dm.relay`)."""
        meta = self.db[c.META].find_one({"_id": "relay"}, {"seq": 1})
        return int((meta or {}).get("seq") or 0)
