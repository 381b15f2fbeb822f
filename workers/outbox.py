"""The supervisor's outbox: its reports to the registry, kept and sent again while the
registry (MongoDB) or Redis is out of reach, so that nothing a node saw is lost.

Each report is a compare-and-set on (deployment, expected states, generation), so
sending one late is safe: if the deployment moved on meanwhile, the registry refuses
it. Reports go out in the order they were made; a report's ``then`` runs with the
registry's answer once it is in (None when refused). An attempt whose answer was lost
may have been applied: a refusal after a failed attempt is checked against the
deployment as it stands.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymongo.errors import ConnectionFailure
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dm.backoff import Backoff
from dm.control import Control
from dm.lifecycle import Actor, transition
from dm.registry import Doc

log = logging.getLogger(__name__)

#: errors that mean a store is out of reach for now: keep the report and try again
UNREACHABLE = (ConnectionFailure, RedisConnectionError, RedisTimeoutError, OSError)
#: seconds before the first retry; doubles after each failed attempt up to RETRY_MAX
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


@dataclass
class Report:
    dep_id: str
    state: str
    expect: list[str]
    generation: int
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)
    then: Callable[[Doc | None], None] | None = None
    attempts: int = 0


class Outbox:
    def __init__(self, ctl: Control, node_id: str) -> None:
        self.ctl = ctl
        self.node_id = node_id
        self.reports: deque[Report] = deque()
        self.retry_at = 0.0
        self.backoff = Backoff(RETRY_FIRST, RETRY_MAX)

    def __len__(self) -> int:
        return len(self.reports)

    def send(
        self,
        dep_id: str,
        state: str,
        *,
        expect: list[str],
        generation: int,
        reason: str,
        then: Callable[[Doc | None], None] | None = None,
        **fields: Any,
    ) -> None:
        """Report a transition now, or as soon as the stores can be reached."""
        self.reports.append(Report(dep_id, state, list(expect), generation, reason, fields, then))
        self.flush()

    def flush(self) -> None:
        """Send what is kept, in order; stop at the first store that cannot be reached."""
        if not self or time.monotonic() < self.retry_at:
            return
        try:
            while self.reports:
                report = self.reports[0]
                doc = self._transition(report)
                self.reports.popleft()
                if report.then is not None:
                    report.then(doc)
        except UNREACHABLE as exc:
            if self.reports:
                self.reports[0].attempts += 1
            delay = self.backoff.next()
            self.retry_at = time.monotonic() + delay
            log.warning("node-%s keeps %d report(s), next try in %.1fs: %s", self.node_id, len(self), delay, exc)
            return
        if self.backoff.failing:
            log.warning("node-%s sent every kept report", self.node_id)
        self.backoff.reset()

    def _transition(self, report: Report) -> Doc | None:
        ports = self.ctl.ports
        if report.attempts:  # the document it was sent with may be stale by now
            report.fields.pop("current", None)
        # the move's effects (freeing the allocation) come with it; one an outage cuts short
        # is finished by the allocations reconciler
        doc = transition(
            ports, report.dep_id, report.state, actor=Actor.NODE, expect=report.expect,
            generation=report.generation, reason=report.reason, **report.fields,
        )  # fmt: skip
        if doc is None and report.attempts:
            # an earlier attempt may have been applied though its answer never came back
            now = ports.store.find(report.dep_id)
            if now and (now["state"], now["generation"], now.get("node")) == (
                report.state, report.generation, self.node_id,
            ):  # fmt: skip
                doc = now
        return doc
