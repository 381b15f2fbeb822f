"""The request path for a batch of messages: screen, record, enqueue.

1. **screen**: decode each message and check it against the repository (known
   algorithm and version, allowed args); what fails becomes a :class:`DeadLetter`;
2. **record**: one bulk insert of the batch's deployments, idempotent on request id
   (:meth:`dm.registry.Registry.create_deployments`), each with its ``pending`` event.
   A write that fails for a permanent reason (:func:`dm.outage.is_outage` says no) is
   split in halves, again and again, until the requests that cause it are alone: each
   of those becomes a dead letter with the error as its reason, the rest are recorded.
   Screening has refused what it knows MongoDB cannot store, so this is the backstop
   for what it does not know;
3. **enqueue**: one ``dm.deploy`` task per deployment still ``pending``
   (:class:`bridge.enqueue.DeployTasks`: one Redis round trip for the batch).

An outage of MongoDB or Redis raises: the caller retries, which is harmless since the
request id makes every step idempotent (a half that was written before its twin failed
is found again as already recorded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.broker import describe
from bridge.enqueue import DeployTasks
from bridge.messages import DeadLetter, Rejected, decode_request
from bridge.settings import BridgeSettings
from dm.control import Control
from dm.errors import BadRequest, DMError, InvalidArgs, UnknownAlgorithm
from dm.models import PENDING, AlgorithmSpec, DeployRequest
from dm.outage import TRANSIENT, is_outage
from dm.package import validate_args
from dm.registry import Doc

log = logging.getLogger("dm.bridge")

#: outages by type alone (see :func:`dm.outage.is_outage` for the whole rule)
OUTAGES = TRANSIENT
#: (record, request, algorithm document) of an acceptable message
Accepted = tuple[Any, DeployRequest, Doc]


@dataclass
class Outcome:
    """What becomes of a batch of messages."""

    #: each acceptable message, with its request and algorithm document
    accepted: list[Accepted] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: deployments to send ``dm.deploy`` for (new ones, and known ones still pending)
    deploy: list[Doc] = field(default_factory=list)
    created: int = 0
    known: int = 0


class Intake:
    def __init__(self, ctl: Control, settings: BridgeSettings, tasks: DeployTasks | None = None) -> None:
        self.ctl, self.settings = ctl, settings
        if tasks is None:
            from dm.app import app

            tasks = DeployTasks(app)
        self.tasks = tasks

    def screen(self, records: Sequence[Any]) -> Outcome:
        """Sort a batch into acceptable requests (with their algorithm) and dead letters."""
        outcome = Outcome()
        algorithms: dict[tuple[str, str | None], Doc | DMError] = {}
        specs: dict[str, AlgorithmSpec] = {}
        for record in records:
            try:
                request = decode_request(record.value, self.settings.max_message_bytes, self.settings.max_request_id)
                key = (request.algorithm, request.version)
                if key not in algorithms:
                    algorithms[key] = self._algorithm(*key)
                algorithm = algorithms[key]
                if isinstance(algorithm, DMError):
                    raise Rejected.of(algorithm)
                if algorithm["_id"] not in specs:
                    specs[algorithm["_id"]] = AlgorithmSpec.from_dict(algorithm["spec"])
                validate_args(specs[algorithm["_id"]], request.args)
            except Rejected as exc:
                outcome.dead.append(dead_letter(record, exc))
            except (InvalidArgs, BadRequest) as exc:
                outcome.dead.append(dead_letter(record, Rejected.of(exc)))
            except Exception as exc:
                if is_outage(exc):
                    raise
                # a bug, but one message must not stall its partition
                log.exception("requests: unexpected error on %s[%d]@%d", record.topic, record.partition, record.offset)
                reason = f"the bridge failed on this message ({type(exc).__name__}: {exc}); please report it"
                outcome.dead.append(dead_letter(record, Rejected(reason, "internal")))
            else:
                outcome.accepted.append((record, request, algorithm))
        return outcome

    def _algorithm(self, name: str, version: str | None) -> Doc | DMError:
        try:
            return self.ctl.registry.get_algorithm(name, version)
        except UnknownAlgorithm as exc:
            return exc

    def record(self, outcome: Outcome) -> None:
        """Record the accepted requests (a request id twice in a batch is one deployment)
        in one write; each deployment carries its ``pending`` event (dm.relay copies it).

        A request whose write fails for a permanent reason becomes a dead letter (with
        every record of the batch that has its request id); outages raise."""
        unique: dict[str, tuple[DeployRequest, Doc]] = {}
        for _, request, algorithm in outcome.accepted:
            unique.setdefault(request.request_id or "", (request, algorithm))
        results, refused = self._create(list(unique.values()))
        outcome.created = sum(1 for _, new in results if new)
        outcome.known = len(results) - outcome.created
        # a known one still pending may have been recorded just before a crash, and never enqueued
        outcome.deploy = [doc for doc, created in results if created or doc["state"] == PENDING]
        if refused:
            for record, request, _ in outcome.accepted:
                exc = refused.get(request.request_id or "")
                if exc is not None:
                    reason = f"MongoDB refused to store this request ({describe(exc)}); it is not retried"
                    outcome.dead.append(dead_letter(record, Rejected(reason, "unstorable")))
            outcome.accepted = [a for a in outcome.accepted if (a[1].request_id or "") not in refused]

    def _create(
        self, items: list[tuple[DeployRequest, Doc]], split: bool = False
    ) -> tuple[list[tuple[Doc, bool]], dict[str, BaseException]]:
        """``create_deployments(items)``, splitting on a permanent error until each request that
        causes one is alone: (results of the ones recorded, {request id: error} of the others)."""
        try:
            return self.ctl.registry.create_deployments(items), {}
        except Exception as exc:
            if is_outage(exc) or not items:
                raise
            if len(items) == 1:
                request = items[0][0]
                log.warning("requests: MongoDB refuses request %r: %s", request.request_id, describe(exc))
                return [], {request.request_id or "": exc}
            if not split:  # once per batch, not once per half
                log.info("requests: a write of %d requests failed (%s); splitting it", len(items), describe(exc))
        middle = len(items) // 2
        first, first_refused = self._create(items[:middle], split=True)
        second, second_refused = self._create(items[middle:], split=True)
        return first + second, first_refused | second_refused

    def enqueue(self, outcome: Outcome) -> None:
        self.tasks.send(outcome.deploy)


def dead_letter(record: Any, exc: Rejected) -> DeadLetter:
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=str(exc),
        error=exc.code,
        key=record.key,
        value=record.value,
        timestamp=record.timestamp,
    )
