"""The lifecycle of a deployment: its states, the table of allowed moves, and the one
function that changes a deployment's state.

Every move is a compare-and-set on (id, rev) in the deployment store, checked against the
expected states (and generation), with its event in the same write; the move's effects
come after, from the table:

- ``release``: the node's allocation is freed (leaving an active state);
- ``kill``: a kill order goes to the node (a stop of a running deployment);
- ``run``: the allocation is recorded and a run order goes to the node (a placement).

An effect that fails for an outage is logged and left to the reconcilers (the registry
is the truth; allocations in the fleet are a cache rebuilt from it, and an order lost
is sent again after the start timeout), so a move is never undone by its effects.

``transition`` is the only writer of a deployment's state once it is recorded (creation
is an insert of a ``pending`` or already ``scheduled`` document). No module of the domain
imports a server's client: the store, the fleet and the dispatcher are the ports of
:mod:`dm.ports`.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dm.errors import DMError

if TYPE_CHECKING:
    from dm.models import DeployRequest
    from dm.ports import Ports

Doc = dict[str, Any]

log = logging.getLogger(__name__)


class DeploymentState(enum.StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    RESTARTING = "restarting"
    LOST = "lost"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class NodeState(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    STOPPING = "stopping"
    DEAD = "dead"
    STOPPED = "stopped"


D = DeploymentState

#: states in which a deployment holds (or is about to hold) a node
ACTIVE = (D.SCHEDULED, D.RUNNING, D.RESTARTING)
#: states from which nothing moves on
FINAL = (D.STOPPED, D.SUCCEEDED, D.FAILED)
#: states that wait for a placement
WAITING = (D.PENDING, D.LOST)
#: node states in which a node may take work
LIVE_NODE = (NodeState.STARTING, NodeState.UP)


class Actor(enum.StrEnum):
    """Who makes a move: the control plane (deployer, reconcilers) or the node running it."""

    CONTROL = "control"
    NODE = "node"


class Effect(enum.StrEnum):
    RELEASE = "release"
    KILL = "kill"
    RUN = "run"


@dataclass(frozen=True)
class Rule:
    actors: frozenset[Actor]
    effects: tuple[Effect, ...] = ()
    #: the move starts a new generation (a new copy, possibly on another node)
    new_generation: bool = False
    #: what the move means, for the docs and the table's test
    means: str = ""


_C = frozenset({Actor.CONTROL})
_N = frozenset({Actor.NODE})
_CN = frozenset({Actor.CONTROL, Actor.NODE})

#: (from, to) -> rule. Anything not here is refused (a programming error, not a race).
TABLE: dict[tuple[DeploymentState, DeploymentState], Rule] = {
    (D.PENDING, D.SCHEDULED): Rule(_C, (Effect.RUN,), True, "placed on a node"),
    (D.LOST, D.SCHEDULED): Rule(_C, (Effect.RUN,), True, "placed again, on another node or the same"),
    (D.PENDING, D.PENDING): Rule(_C, (), False, "still no room (the reason changed)"),
    (D.LOST, D.PENDING): Rule(_C, (), False, "lost, and no room to place it again"),
    (D.SCHEDULED, D.RUNNING): Rule(_N, (), False, "its node started it"),
    (D.RESTARTING, D.RUNNING): Rule(_N, (), False, "its node started it again"),
    (D.RUNNING, D.RESTARTING): Rule(_N, (), False, "it exited; the restart policy starts it again"),
    (D.SCHEDULED, D.RESTARTING): Rule(_N, (), False, "it could not be started; the restart policy tries again"),
    (D.RESTARTING, D.RESTARTING): Rule(_N, (), False, "a restart failed to start; the policy tries again"),
    (D.RUNNING, D.SUCCEEDED): Rule(_N, (Effect.RELEASE,), False, "it exited with 0"),
    (D.RUNNING, D.FAILED): Rule(_N, (Effect.RELEASE,), False, "it exited against its restart policy"),
    (D.SCHEDULED, D.FAILED): Rule(_N, (Effect.RELEASE,), False, "it cannot be started (bad package, bad command)"),
    (D.RESTARTING, D.FAILED): Rule(_N, (Effect.RELEASE,), False, "a restart cannot be started"),
    (D.SCHEDULED, D.LOST): Rule(_CN, (Effect.RELEASE,), False, "its node died or did not start it in time"),
    (D.RUNNING, D.LOST): Rule(_CN, (Effect.RELEASE,), False, "its node died, stopped or fenced itself"),
    (D.RESTARTING, D.LOST): Rule(_CN, (Effect.RELEASE,), False, "its node died, stopped or fenced itself"),
    (D.SCHEDULED, D.STOPPING): Rule(_C, (Effect.KILL,), False, "stop asked; the node kills it"),
    (D.RUNNING, D.STOPPING): Rule(_C, (Effect.KILL,), False, "stop asked; the node kills it"),
    (D.RESTARTING, D.STOPPING): Rule(_C, (Effect.KILL,), False, "stop asked; the node kills it"),
    (D.STOPPING, D.STOPPED): Rule(_CN, (Effect.RELEASE,), False, "killed by its node (or its node died)"),
    (D.PENDING, D.STOPPED): Rule(_C, (), False, "stopped before it was placed"),
    (D.LOST, D.STOPPED): Rule(_C, (), False, "stopped while it waited to be placed again"),
}


def event_of(doc: Doc, frm: str | None = None) -> Doc:
    """The event of a deployment's current state (as pushed onto its ``history``), and
    ``from``: the state it left (None for the first), from which the relay keeps the count
    of deployments in each state (see :mod:`dm.relay`)."""
    return {
        "deployment_id": doc["_id"],
        "request_id": doc["request_id"],
        "algorithm": doc["algorithm"],
        "state": str(doc["state"]),
        "from": None if frm is None else str(frm),
        "node": doc.get("node"),
        "generation": doc["generation"],
        "rev": doc["rev"],
        "time": doc["updated_at"],
        "reason": doc.get("reason", ""),
        "exit_code": doc.get("exit_code"),
    }


def event_passing(doc: Doc, state: str, reason: str, now: float, fields: dict[str, Any] | None = None) -> Doc:
    """The event of a state a move passes through (``via`` of :func:`transition_many`): at the
    rev after ``doc``'s, on the node it had, with ``fields`` (its reason) over ``reason``."""
    return event_of({**doc, "state": state, "reason": reason, "updated_at": now, "rev": doc["rev"] + 1,
                     **(fields or {})}, doc["state"])  # fmt: skip


def new_deployment(
    request: DeployRequest, algorithm: Doc, node: str | None = None, reason: str = "", since: float = 0.0
) -> Doc:
    """A new deployment as it is first recorded: ``pending`` (generation 0, rev 0), or with
    ``node`` already ``scheduled`` there (generation 1, rev 1); its events in ``history``.
    ``since``: when the request arrived (the ``pending`` event's time; default now)."""
    spec, now, dep_id = algorithm["spec"], time.time(), uuid.uuid4().hex[:12]
    doc: Doc = {
        "_id": dep_id,
        "request_id": request.request_id or dep_id,
        "algorithm": algorithm["name"],
        "version": algorithm["version"],
        "sha256": algorithm["sha256"],
        "args": request.args,
        "command": spec["command"],
        "env": spec.get("env") or {},
        "demand": spec["demand"],
        "restart": spec["restart"],
        # seconds a cut-off node keeps it running; the control plane waits as long to move it
        "keep_for": float(
            request.keep_for if request.keep_for is not None else (spec.get("disconnect") or {}).get("keep_for") or 0.0
        ),
        "state": D.PENDING.value,
        "node": None,
        "generation": 0,
        "rev": 0,
        "pid": None,
        "restarts": 0,
        "exit_code": None,
        "reason": reason if node is None and reason else "requested",
        "created_at": since or now,
        "updated_at": since or now,
    }
    history = [event_of(doc)]
    if node is not None:
        doc.update(state=D.SCHEDULED.value, node=node, generation=1, rev=1, reason=reason, scheduled_at=now,
                   updated_at=now)  # fmt: skip
        history.append(event_of(doc, D.PENDING.value))
    doc["history"] = history
    return doc


class IllegalTransition(DMError):
    """A move the table does not allow: a bug in the caller, never a race."""

    code = "illegal_transition"


def rule(frm: str, to: str, actor: Actor) -> Rule:
    """The rule of a move, or :class:`IllegalTransition`."""
    found = TABLE.get((DeploymentState(frm), DeploymentState(to)))
    if found is None or actor not in found.actors:
        raise IllegalTransition(f"{actor} may not move a deployment from {frm} to {to}")
    return found


def transition(
    ports: Ports,
    dep_id: str,
    to: str,
    *,
    actor: Actor,
    expect: tuple[str, ...] | list[str],
    generation: int | None = None,
    reason: str = "",
    current: Doc | None = None,
    run: dict[str, Any] | None = None,
    **fields: Any,
) -> Doc | None:
    """Move a deployment to ``to`` if it is in one of ``expect`` (and ``generation``);
    returns the new document, or None when the store refused (it moved on meanwhile).

    ``current`` is the document as the caller last read it (saves a read). ``run`` holds
    what the ``run`` effect needs: ``demand`` and the placement ``lock`` to release with
    the order. The effects of the table follow the write.
    """
    target = DeploymentState(to)
    rules = {str(frm): rule(frm, target, actor) for frm in expect}
    new_generation = any(r.new_generation for r in rules.values())
    if new_generation and not all(r.new_generation for r in rules.values()):
        raise IllegalTransition(f"moves to {to} from {list(expect)} disagree on a new generation")
    before: Doc | None = None

    def seen(doc: Doc) -> None:
        nonlocal before
        before = doc

    new = ports.store.compare_and_set(
        dep_id,
        target.value,
        expect=[str(s) for s in expect],
        generation=generation,
        reason=reason,
        new_generation=new_generation,
        current=current,
        seen=seen,
        fields=fields,
    )
    if new is None:
        return None
    frm = str((before or {}).get("state", new["state"]))
    apply_effects(ports, rules.get(frm, next(iter(rules.values()))).effects, new, before, run=run, reason=reason)
    return new


def transition_many(
    ports: Ports,
    docs: list[Doc],
    to: str,
    *,
    actor: Actor,
    reason: str,
    each: list[dict[str, Any]] | None = None,
    lock: Any = None,
    via: str | None = None,
    via_each: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> list[Doc]:
    """The same move for many deployments, each as the caller read it (its state, generation
    and rev are the compare-and-set), in one write of the store where it can; returns those
    moved. The table is checked as :func:`transition` checks it; effects follow for each.
    A fail-over of a node with hundreds of deployments is one round trip, not hundreds.

    A move that places (to ``scheduled``: a new generation) gives each deployment its node in
    ``each`` and holds the placement ``lock``; the allocations are recorded already (the fleet
    made them as it chose), and the run orders go out with the lock's release in one call.

    ``via``: two moves of the table in one write, through that state (``lost`` on the way from
    a dead node to a new one: its event is recorded with ``via_each``'s reason, then the
    placement's), the effects of both following."""
    target = DeploymentState(to)
    if via is None:
        rules = {str(d["state"]): rule(d["state"], target, actor) for d in docs}
    else:
        second = rule(via, target, actor)
        rules = {}
        for d in docs:
            first = rule(d["state"], via, actor)
            rules[str(d["state"])] = Rule(first.actors & second.actors, first.effects + second.effects,
                                          first.new_generation or second.new_generation)  # fmt: skip
    places = any(r.new_generation for r in rules.values())
    if places and (each is None or any(not e.get("node") for e in each)):
        raise IllegalTransition("a batch move that places names each deployment's node (each=[{'node': ...}])")
    moved = ports.store.compare_and_set_many(
        docs, target.value, reason=reason, fields=fields, each=each, new_generation=places,
        via=None if via is None else DeploymentState(via).value, via_each=via_each,
    )  # fmt: skip
    before = {d["_id"]: d for d in docs}
    runs = []
    for new in moved:
        old = before[new["_id"]]
        effects = rules[str(old["state"])].effects
        if Effect.RUN in effects:
            runs.append(new)
            effects = tuple(e for e in effects if e is not Effect.RUN)
        apply_effects(ports, effects, new, old, reason=reason)
    if places:
        try:
            ports.dispatcher.run_many(runs, lock)
        except Exception as exc:  # the writes stand: the orders are sent again after the start timeout
            if not ports.is_outage(exc):
                raise
            log.warning("run orders of %d deployments left to the reconcilers: %s", len(runs), exc)
    return moved


def set_node_state(ports: Ports, node_id: str, state: NodeState, expect: tuple[str, ...] | None = None) -> bool:
    """The one writer of a node's state: the registry's record first (the truth, a
    compare-and-set when ``expect`` is given), then the fleet's copy that placement reads.
    False when the registry refused; the fleet's copy is brought along all the same."""
    won = ports.nodes.set_node_state(node_id, state.value, expect=expect)
    if won or expect is None:
        ports.fleet.set_state(node_id, state.value)
    return won


def apply_effects(
    ports: Ports,
    effects: tuple[Effect, ...],
    new: Doc,
    before: Doc | None,
    *,
    run: dict[str, Any] | None = None,
    reason: str = "",
) -> None:
    """Apply a move's effects; an outage is logged and left to the reconcilers."""
    for effect in effects:
        try:
            if effect is Effect.RELEASE:
                node = (before or {}).get("node") or new.get("node")
                if node:
                    ports.fleet.release(str(node), new["_id"])
            elif effect is Effect.KILL:
                ports.dispatcher.kill(new, reason)
            elif effect is Effect.RUN:
                extra = run or {}
                ports.dispatcher.run(new, extra.get("demand"), extra.get("lock"))
        except Exception as exc:  # the write stands; reconcilers finish what an outage cut short
            if not ports.is_outage(exc):
                raise
            log.warning("%s of deployment %s left to the reconcilers: %s", effect, new.get("_id"), exc)
