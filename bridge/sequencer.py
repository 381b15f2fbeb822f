"""Which unpublished events may go out now: per deployment, in rev order, without gaps.

A deployment's events carry ``rev`` 0, 1, 2, ... (one per compare-and-set), but a
slower process may insert rev N just after another inserted rev N+1. So the sequencer
remembers, per deployment, the next rev it expects, and holds back a later one until
the missing rev shows up. A rev missing for longer than ``gap_timeout`` (its writer
died between its compare-and-set and its event) is given up with a warning, so one
lost event never blocks a deployment's later ones. An event whose rev was published
already (written twice) is skipped: marked published, not sent again.

Pure apart from two look-ups it is given, so unit tests run it without servers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dm.bridge")

Doc = dict[str, Any]


@dataclass
class Plan:
    #: to publish, in order (per deployment, rising rev)
    send: list[Doc] = field(default_factory=list)
    #: duplicates of published revs: mark them published, send nothing
    skip: list[Doc] = field(default_factory=list)
    #: events held back behind a missing rev
    held: int = 0
    #: deployment id -> the next rev expected once this plan is published
    advance: dict[str, int] = field(default_factory=dict)


class Sequencer:
    def __init__(
        self,
        gap_timeout: float,
        published_revs: Callable[[list[str]], dict[str, int]],
        unpublished_of: Callable[[list[str]], list[Doc]],
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 100_000,
    ) -> None:
        self.gap_timeout, self.clock, self.capacity = gap_timeout, clock, capacity
        self.published_revs, self.unpublished_of = published_revs, unpublished_of
        #: deployment id -> next rev to publish (a cache: the registry has the truth)
        self.next_rev: dict[str, int] = {}
        #: deployment id -> (missing rev, when first seen missing)
        self.gaps: dict[str, tuple[int, float]] = {}
        #: next_rev is also written by the intake's thread (:meth:`note_published`)
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Forget what was published (another bridge may have published meanwhile)."""
        with self.lock:
            self.next_rev.clear()
            self.gaps.clear()

    def note_published(self, deployment_ids: Iterable[str], rev: int) -> None:
        """Rev ``rev`` of these deployments was published by someone else (this bridge's intake)."""
        with self.lock:
            for dep in deployment_ids:
                self._advance(dep, rev + 1)

    def plan(self, events: Iterable[Doc]) -> Plan:
        by_dep = _group(events)
        with self.lock:
            cached = {d: self.next_rev[d] for d in by_dep if d in self.next_rev}
        unknown = [d for d, evs in by_dep.items() if d not in cached and evs[0]["rev"] != 0]
        known = self.published_revs(unknown) if unknown else {}
        expected = {d: cached.get(d, known.get(d, -1) + 1) for d in by_dep}
        # a scan is a window of the oldest events: a gap's rev may just lie beyond it
        gapped = [d for d, evs in by_dep.items() if evs[0]["rev"] > expected[d]]
        if gapped:
            seen = {e["_id"] for evs in by_dep.values() for e in evs}
            extra = [e for e in self.unpublished_of(gapped) if e["_id"] not in seen]
            for d, evs in _group(extra).items():
                by_dep[d] = sorted(by_dep[d] + evs, key=_order)
        plan = Plan()
        now = self.clock()
        for dep, evs in by_dep.items():
            want = expected[dep]
            for i, event in enumerate(evs):
                rev = int(event["rev"])
                if rev < want:
                    plan.skip.append(event)
                    continue
                if rev > want and not self._give_up(dep, want, rev, now):
                    plan.held += len(evs) - i
                    break
                plan.send.append(event)
                want = rev + 1
            plan.advance[dep] = want
        return plan

    def _give_up(self, dep: str, missing: int, found: int, now: float) -> bool:
        rev, since = self.gaps.get(dep, (missing, now))
        if rev != missing:
            since = now
        self.gaps[dep] = (missing, since)
        if now - since < self.gap_timeout:
            return False
        log.warning(
            "events: deployment %s: rev %d..%d never appeared in %.0fs; publishing rev %d after the gap",
            dep, missing, found - 1, self.gap_timeout, found,
        )  # fmt: skip
        return True

    def confirm(self, plan: Plan) -> None:
        """Remember a plan once its events are published and marked."""
        with self.lock:
            for dep, rev in plan.advance.items():
                self._advance(dep, rev)
                gap = self.gaps.get(dep)
                if gap is not None and gap[0] < rev:
                    del self.gaps[dep]

    def _advance(self, dep: str, rev: int) -> None:
        rev = max(rev, self.next_rev.pop(dep, 0))
        self.next_rev[dep] = rev  # re-inserted: the oldest entries go first
        while len(self.next_rev) > self.capacity:
            del self.next_rev[next(iter(self.next_rev))]


def _order(event: Doc) -> tuple[int, str]:
    return int(event["rev"]), str(event["_id"])


def _group(events: Iterable[Doc]) -> dict[str, list[Doc]]:
    by_dep: dict[str, list[Doc]] = {}
    for event in events:
        by_dep.setdefault(event["deployment_id"], []).append(event)
    for evs in by_dep.values():
        evs.sort(key=_order)
    return by_dep
