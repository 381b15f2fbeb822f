"""Deployments in MongoDB: the store port of :mod:`dm.ports`.

A move is one ``update_one`` on (id, rev) that sets the new state and pushes the move's
event onto the deployment's own ``history`` (a transactional outbox: the relay copies it
to ``events``). Not findAndModify: it scans the whole collection on the
MongoDB-compatible server, so its cost grew with every deployment ever made.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from dm.lifecycle import ACTIVE, WAITING, D, event_of, event_passing
from dm.models import Demand
from dm.registry import Registry
from dm.registry.base import find_in

#: the field a batch compare-and-set marks its writes with (see compare_and_set_many)
WRITE_MARK = "write"

Doc = dict[str, Any]

#: tries of a compare-and-set that lost a race before it reads again and gives up
CAS_ATTEMPTS = 5
#: events a deployment keeps in its own ``history``, at least (the relay has long copied older ones)
HISTORY_KEEP = 50
#: what a read of a deployment leaves out (its events are the relay's)
NO_HISTORY = {"history": 0}


def _values(*states: D) -> list[str]:
    return [s.value for s in states]


class MongoDeployments:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.col = registry.deployments

    def get(self, dep_id: str) -> Doc:
        return self.registry.get_deployment(dep_id)

    def find(self, dep_id: str) -> Doc | None:
        return self.col.find_one({"_id": dep_id}, NO_HISTORY)

    def by_request(self, request_id: str) -> Doc | None:
        return self.col.find_one({"request_id": request_id}, NO_HISTORY)

    def create(self, doc: Doc) -> tuple[Doc, bool]:
        try:
            self.col.insert_one(doc)
        except DuplicateKeyError:
            existing = self.by_request(doc["request_id"])
            if existing is None:
                raise  # a clash of the random _id: the caller makes a new one
            return existing, False
        return doc, True

    def compare_and_set(
        self,
        dep_id: str,
        state: str,
        *,
        expect: list[str],
        generation: int | None,
        reason: str,
        new_generation: bool,
        current: Doc | None,
        seen: Callable[[Doc], None],
        fields: dict[str, Any],
    ) -> Doc | None:
        doc = current
        for _ in range(CAS_ATTEMPTS):
            if doc is None:
                doc = self.find(dep_id)
            if doc is None or doc["state"] not in expect:
                return None
            if generation is not None and doc["generation"] != generation:
                return None
            sets = {"state": state, "reason": reason, "updated_at": time.time(), **fields}
            step = 1 if new_generation else 0
            new = {**doc, **sets, "rev": doc["rev"] + 1, "generation": doc["generation"] + step}
            new.pop("history", None)
            event = event_of(new, doc["state"])
            result = self.col.update_one(
                {"_id": dep_id, "rev": doc["rev"]},
                {
                    "$set": sets,
                    "$inc": {"rev": 1, "generation": step},
                    # trimmed every HISTORY_KEEP-th move only: a $slice costs on each write
                    "$push": {"history": {"$each": [event], "$slice": -HISTORY_KEEP}}
                    if new["rev"] % HISTORY_KEEP == 0
                    else {"history": event},
                },
            )
            if result.modified_count == 1:
                seen(doc)
                return new
            doc = None  # changed since it was read: read again and decide again
        return None

    def compare_and_set_many(
        self,
        docs: list[Doc],
        state: str,
        *,
        reason: str,
        fields: dict[str, Any],
        each: list[dict[str, Any]] | None = None,
        new_generation: bool = False,
        via: str | None = None,
        via_each: list[dict[str, Any]] | None = None,
    ) -> list[Doc]:
        if not docs:
            return []
        now = time.time()
        step = 1 if new_generation else 0
        revs = 2 if via else 1
        # this write's mark: a deployment another writer moved to the same rev and state
        # meanwhile (a single placement racing the batch) is not taken for one of ours
        token = uuid.uuid4().hex[:16]
        news, ops = [], []
        for i, doc in enumerate(docs):
            sets = {"state": state, "reason": reason, "updated_at": now, **fields, **(each[i] if each else {}),
                    WRITE_MARK: token}  # fmt: skip
            # the state passed through: its event only
            events = [event_passing(doc, via, reason, now, via_each[i] if via_each else None)] if via else []
            new = {**doc, **sets, "rev": doc["rev"] + revs, "generation": doc["generation"] + step}
            new.pop("history", None)
            new.pop(WRITE_MARK, None)
            news.append(new)
            events.append(event_of(new, via or doc["state"]))
            # trimmed when a HISTORY_KEEP-th move is among these only: a $slice costs on each write
            if any(e["rev"] % HISTORY_KEEP == 0 for e in events):
                push = {"history": {"$each": events, "$slice": -HISTORY_KEEP}}
            else:
                push = {"history": {"$each": events} if via else events[0]}
            ops.append(
                UpdateOne(
                    {"_id": doc["_id"], "rev": doc["rev"]},
                    {"$set": sets, "$inc": {"rev": revs, "generation": step} if step else {"rev": revs}, "$push": push},
                )
            )
        result = self.col.bulk_write(ops, ordered=False)
        if result.modified_count == len(ops):
            return news
        # some had moved on meanwhile: the moved ones are those that carry this write's mark at
        # the new rev (another writer's move to the same rev does not)
        now_at = {d["_id"]: d for d in find_in(self.col, [d["_id"] for d in docs], {"rev": 1, WRITE_MARK: 1})}
        return [
            n
            for n in news
            if (now_at.get(n["_id"]) or {}).get("rev") == n["rev"] and now_at[n["_id"]].get(WRITE_MARK) == token
        ]

    def active_on(self, node_id: str) -> list[Doc]:
        return list(self.col.find({"state": {"$in": _values(*ACTIVE, D.STOPPING)}, "node": node_id}, NO_HISTORY))

    def waiting(self, limit: int, lost: bool = True) -> list[Doc]:
        query = {"state": {"$in": _values(*WAITING)} if lost else D.PENDING.value}
        return list(self.col.find(query, NO_HISTORY).sort("created_at", 1).limit(limit))  # (state, created_at)

    def unstarted(self, before: float, limit: int) -> list[Doc]:
        query = {"state": D.SCHEDULED.value, "scheduled_at": {"$lt": before}}
        return list(self.col.find(query, NO_HISTORY).limit(limit))

    def nodes_holding(self, node_ids: list[str]) -> list[str]:
        if not node_ids:
            return []
        # one equality query per node on (node, state): a distinct with $in on both is a scan
        states = _values(*ACTIVE, D.STOPPING)
        held = [n for n in node_ids if self.col.find_one({"node": n, "state": {"$in": states}}, {"_id": 1})]
        return sorted(held)

    def any_waiting(self) -> bool:
        return bool(self.col.count_documents({"state": {"$in": _values(*WAITING)}}, limit=1))

    def active_by_node(self) -> dict[str, dict[str, Demand]]:
        out: dict[str, dict[str, Demand]] = {}
        for doc in self.col.find({"state": {"$in": _values(*ACTIVE)}}, {"node": 1, "demand": 1}):
            if doc.get("node"):
                out.setdefault(str(doc["node"]), {})[doc["_id"]] = Demand.from_dict(doc.get("demand") or {})
        return out
