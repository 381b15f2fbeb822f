"""The deploy path: record a request, place it on a node, send it to the node's queue.

``place`` holds the placement lock only around decide + reserve + the registry
write, so concurrent deployers (threads or control workers) never overcommit a node.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.exceptions import LockError

from dm import balancer, fleet, node_manager, signing
from dm import constants as c
from dm.app import app
from dm.control import Control
from dm.models import (
    ACTIVE_STATES,
    FINAL_STATES,
    LOST,
    PENDING,
    SCHEDULED,
    STOPPED,
    STOPPING,
    AlgorithmSpec,
    Demand,
    DeployRequest,
)
from dm.package import validate_args
from dm.registry import Doc
from dm.sender import Order, TaskSender

log = logging.getLogger(__name__)

#: fields of a deployment shown to users and returned by ``deploy``
PUBLIC_FIELDS = (
    "request_id", "algorithm", "version", "args", "state", "node", "generation",
    "pid", "restarts", "exit_code", "reason", "created_at", "updated_at",
)  # fmt: skip


def public(doc: Doc) -> dict[str, Any]:
    """A deployment as JSON for users: ``id`` plus the public fields."""
    return {"id": doc["_id"], **{k: doc.get(k) for k in PUBLIC_FIELDS}}


#: seconds the placement lock lives (a deployer that dies holding it holds placements up this long)
LOCK_TTL = 30.0
#: seconds a deployer waits for the placement lock before it gives up
LOCK_WAIT = 60.0


class _Held:
    """The placement lock, held as a token; released once: in the last pipeline, or at the end."""

    def __init__(self, r: Any, token: str) -> None:
        self.r, self.token, self.released = r, token, False

    def release(self, pipe: Any = None) -> None:
        if not self.released:
            fleet.unlock(self.r, self.token, pipe)
            self.released = True


@contextmanager
def _placing(ctl: Control, demand: Demand) -> Iterator[tuple[_Held, str | None, str, list[balancer.NodeView]]]:
    """Hold the placement lock and choose a node for ``demand``: (lock, node id, reason, nodes).

    For the policies ``min`` and ``max`` one Redis script takes the lock and chooses (the
    arithmetic of :mod:`dm.balancer`, on the same figures). When nothing fits, or for
    ``p2c``, the fleet is read and :func:`dm.balancer.choose` decides; node id None: no
    node fits (``nodes`` is the fleet then, for the node manager).
    """
    r, s = ctl.redis, ctl.settings
    token = uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        if s.policy in fleet.DECIDE_POLICIES:
            answer = fleet.decide(r, token, demand, s.threshold, s.policy, s.reservation_settle, LOCK_TTL)
        else:
            answer = ["read"] if r.set(c.PLACEMENT_LOCK, token, nx=True, px=int(LOCK_TTL * 1000)) else ["locked"]
        if answer[0] != "locked":
            break
        if time.monotonic() > deadline:
            raise LockError(f"the placement lock {c.PLACEMENT_LOCK} was held for over {LOCK_WAIT:g}s; try again")
        time.sleep(0.002)
    held = _Held(r, token)
    try:
        if answer[0] == "ok":
            yield held, answer[1], f"placed on node-{answer[1]} (load {float(answer[2]):.1f})", []
        else:
            nodes = fleet.snapshot(r, s.reservation_settle)
            chosen = balancer.choose(nodes, demand, s.threshold, s.policy)
            if chosen is not None:
                yield held, chosen.id, f"placed on node-{chosen.id} (load {balancer.score(chosen):.1f})", nodes
            else:
                yield held, None, "", nodes
    finally:
        held.release()


def deploy(ctl: Control, request: DeployRequest) -> Doc:
    """Validate, decide where, and record the deployment already ``scheduled`` there in one
    registry write (its ``pending`` and ``scheduled`` events ride along), then dispatch it.

    The same request id gives back the first deployment (placed, if it still waits).
    With no room and no node to add, it is recorded ``pending`` with the reason.
    """
    received = time.time()  # the pending event's time: placement latency is measured from it
    algorithm = ctl.algorithm(request.algorithm, request.version)
    validate_args(AlgorithmSpec.from_dict(algorithm["spec"]), request.args)
    demand = Demand.from_dict(algorithm["spec"]["demand"])
    known: Doc | None = None
    with _placing(ctl, demand) as (held, node_id, reason, nodes):
        if node_id is None and request.request_id:
            # about to start a node: not for a request that is recorded already
            known = ctl.registry.deployments.find_one({"request_id": request.request_id}, {"history": 0})
        if known is None:
            if node_id is None:
                node_id, reason = _add_or_wait(ctl, nodes)
            doc, created = ctl.registry.create_deployment(
                request, algorithm, node=node_id, reason=reason, since=received
            )
            doc.pop("history", None)
            if created and node_id is not None:
                _allocate_and_dispatch(ctl, doc, demand, held)
    if known is not None:
        return place(ctl, known["_id"], known)
    if not created:  # a redelivery or a retry: go on from where the first stopped
        return place(ctl, doc["_id"], doc)
    return doc


def _add_or_wait(ctl: Control, nodes: list[balancer.NodeView]) -> tuple[str | None, str]:
    """No node has room: (a new node's id, reason), or (None, why) when none can be added.
    Called with the placement lock held."""
    settings = ctl.settings
    added = node_manager.add_node(ctl, nodes)
    if added is not None:
        return added, f"placed on new node-{added}: no node had room under {settings.threshold:g}%"
    return None, (
        f"waiting for room: {len(nodes)} node(s), none under {settings.threshold:g}% "
        f"with this demand, and max_nodes={settings.max_nodes} reached"
    )


def transition(ctl: Control, dep_id: str, state: str, **kwargs: Any) -> Doc | None:
    """A registry compare-and-set that also frees the node's allocation on leaving it."""
    doc = ctl.registry.transition(dep_id, state, **kwargs)
    if doc is not None and state not in ACTIVE_STATES:
        old_node = kwargs.get("node", doc.get("node"))
        if old_node:
            fleet.release(ctl.redis, old_node, dep_id)
    return doc


def place(ctl: Control, dep_id: str, doc: Doc | None = None) -> Doc:
    """Place a ``pending`` or ``lost`` deployment and dispatch it; a no-op for any other state.

    ``doc`` is the deployment as the caller just read or made it (saves a read).
    """
    doc = doc if doc is not None else ctl.registry.get_deployment(dep_id)
    if doc["state"] not in (PENDING, LOST):
        return doc
    demand = Demand.from_dict(doc["demand"])
    with _placing(ctl, demand) as (held, node_id, reason, nodes):
        if node_id is None:
            node_id, reason = _add_or_wait(ctl, nodes)
        if node_id is None:
            if doc["state"] == PENDING and doc.get("reason") == reason:
                return doc
            waiting = ctl.registry.transition(
                doc["_id"], PENDING, expect=(PENDING, LOST), generation=doc["generation"], reason=reason, current=doc
            )
            return waiting or ctl.registry.get_deployment(doc["_id"])
        placed = ctl.registry.transition(
            dep_id,
            SCHEDULED,
            expect=(PENDING, LOST),
            generation=doc["generation"],
            new_generation=True,
            reason=reason,
            node=node_id,
            pid=None,
            scheduled_at=time.time(),
            current=doc,
        )
        if placed is None:  # another deployer placed or stopped it first
            return ctl.registry.get_deployment(dep_id)
        _allocate_and_dispatch(ctl, placed, demand, held)
    return placed


def _allocate_and_dispatch(ctl: Control, doc: Doc, demand: Demand, held: _Held) -> None:
    """Record the allocation, release the placement lock and send ``dm.run`` to the node, in
    one Redis round trip when the broker is this Redis. After the registry write."""
    pipe = ctl.redis.pipeline(transaction=False)
    fleet.allocate(ctl.redis, doc["node"], doc["_id"], demand, pipe=pipe)
    held.release(pipe)
    same = app.conf.broker_url == ctl.settings.redis_url
    queued = same and sender().push(pipe, [_run_order(doc)])
    pipe.execute()
    if not queued:
        dispatch(doc)


def run_payload(doc: Doc) -> dict[str, Any]:
    """What a node needs to run a deployment (JSON)."""
    return {
        "id": doc["_id"],
        "request_id": doc["request_id"],
        "generation": doc["generation"],
        # the deployment's rev as sent, and when: a fresh order starts without reading it again
        "rev": doc["rev"],
        "sent_at": time.time(),
        "algorithm": doc["algorithm"],
        "version": doc["version"],
        "sha256": doc["sha256"],
        "command": doc["command"],
        "env": doc.get("env") or {},
        "args": doc.get("args") or {},
        "restart": doc["restart"],
        "restarts": doc.get("restarts", 0),
    }


_sender: TaskSender | None = None


def sender() -> TaskSender:
    global _sender
    if _sender is None or _sender.url != str(app.conf.broker_url or ""):
        _sender = TaskSender(app)
    return _sender


def _run_order(doc: Doc) -> Order:
    # argsrepr: what Flower shows for the task: the algorithm, the deployment and its generation
    argsrepr = f"{doc['algorithm']} deployment={doc['_id']} generation={doc['generation']}"
    return ("dm.run", c.NODE_QUEUE_PREFIX + doc["node"], [run_payload(doc)], {}, argsrepr)


def dispatch(doc: Doc) -> None:
    """Send ``dm.run`` of a placed deployment to its node's queue."""
    sender().send([_run_order(doc)])


def place_pending(ctl: Control, limit: int = 100) -> int:
    """Try again to place deployments that wait for room; returns how many were placed."""
    placed = 0
    for doc in ctl.registry.list_deployments([PENDING, LOST], limit=limit):
        if place(ctl, doc["_id"])["state"] == SCHEDULED:
            placed += 1
        else:
            break  # no room for this one: later ones would mostly not fit either
    return placed


def stop(ctl: Control, dep_id: str, reason: str = "stopped by request") -> Doc:
    """Stop a deployment: at once when it holds no node, else through its node."""
    doc = ctl.registry.get_deployment(dep_id)
    if doc["state"] in FINAL_STATES or doc["state"] == STOPPING:
        return doc
    if doc["state"] in (PENDING, LOST):
        done = transition(ctl, doc["_id"], STOPPED, expect=(PENDING, LOST), reason=reason)
        return done or stop(ctl, dep_id, reason)
    stopping = ctl.registry.transition(
        doc["_id"], STOPPING, expect=ACTIVE_STATES, generation=doc["generation"], reason=reason
    )
    if stopping is None:
        return stop(ctl, dep_id, reason)  # it moved on meanwhile: look again
    kill = signing.kill_args(doc["_id"], doc["generation"], reason, ctl.settings)  # signed: dm/signing.py
    app.send_task("dm.kill", args=kill, queue=c.NODE_QUEUE_PREFIX + doc["node"])
    return stopping
