"""The deploy path: record a request, place it on a node, send it to the node's queue.

Plain functions of the domain over :class:`dm.ports.Ports`; no server's client is imported
here. The placement lock is held only around decide + reserve + the registry write, so
concurrent deployers (threads or control workers) never overcommit a node; a node is never
started with the lock held (the reconcilers add nodes, outside it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dm import balancer
from dm.errors import InvalidArgs, NoCapacity
from dm.lifecycle import (
    ACTIVE,
    FINAL,
    WAITING,
    Actor,
    D,
    Effect,
    apply_effects,
    new_deployment,
    rule,
    transition,
    transition_many,
)
from dm.models import AlgorithmSpec, Demand, DeployRequest
from dm.package import validate_args
from dm.ports import Lock, Ports
from dm.storable import Unstorable, check_storable

log = logging.getLogger(__name__)

Doc = dict[str, Any]

#: fields of a deployment shown to users and returned by ``deploy``
PUBLIC_FIELDS = (
    "request_id", "algorithm", "version", "args", "state", "node", "generation",
    "pid", "restarts", "exit_code", "reason", "created_at", "updated_at",
)  # fmt: skip


def public(doc: Doc) -> dict[str, Any]:
    """A deployment as JSON for users: ``id`` plus the public fields."""
    return {"id": doc["_id"], **{k: _plain(doc.get(k)) for k in PUBLIC_FIELDS}}


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, D) else value


@contextmanager
def _placing(ports: Ports, demand: Demand) -> Iterator[tuple[Lock, str | None, str, list[balancer.NodeView]]]:
    """Hold the placement lock and choose a node for ``demand``: (lock, node id, reason, nodes).

    For the policies ``min`` and ``max`` the fleet chooses as it takes the lock (one
    Redis script, the arithmetic of :mod:`dm.balancer`). Otherwise, or when nothing fits,
    the fleet is read and :func:`dm.balancer.choose` decides; node id None: no node fits
    (``nodes`` is the fleet then, to tell why).
    """
    s = ports.settings
    lock, node_id, score = ports.fleet.place_lock(demand, s.threshold, s.policy, s.reservation_settle)
    try:
        if node_id is not None:
            yield lock, node_id, f"placed on node-{node_id} (load {score or 0.0:.1f})", []
        else:
            nodes = ports.fleet.snapshot(s.reservation_settle)
            chosen = balancer.choose(nodes, demand, s.threshold, s.policy)
            if chosen is not None:
                yield lock, chosen.id, f"placed on node-{chosen.id} (load {balancer.score(chosen):.1f})", nodes
            else:
                yield lock, None, "", nodes
    finally:
        lock.release()


#: the largest args a deployment takes, as JSON: they reach the algorithm in one environment
#: variable (DM_ARGS), and Linux refuses one longer than 128 KiB (MAX_ARG_STRLEN) at exec
MAX_ARGS_BYTES = 64 * 1024


def check_args_storable(args: dict[str, Any]) -> None:
    """Refuse args the registry cannot store or the environment cannot carry, saying why."""
    try:
        check_storable({"args": args})
    except Unstorable as exc:
        raise InvalidArgs(f"{exc}") from exc
    size = len(json.dumps(args, ensure_ascii=False).encode())
    if size > MAX_ARGS_BYTES:
        raise InvalidArgs(
            f"args are {size:,} bytes as JSON, over the {MAX_ARGS_BYTES:,} an algorithm can be given in DM_ARGS; "
            "pass large inputs by reference (a path or a URL in the args) instead"
        )


def check_fits(ports: Ports, demand: Demand) -> None:
    """Refuse a demand no node the provider starts can ever hold, with a message that names
    the node size. A provider that starts no nodes (``static``) refuses nothing: an operator
    may start a bigger node by hand, and a deployment that waits for it holds up no other."""
    s = ports.settings
    if not ports.provider.starts_nodes:
        return
    limit = s.threshold / 100.0
    sizes = [(s.node_cpus, s.node_memory)]
    if demand.cpu <= s.node_cpus * limit + 1e-9 and demand.memory <= s.node_memory * limit + 1e-9:
        return  # a node of the size the provider starts takes it: no need to read the fleet
    sizes += [(n.cpus, n.memory) for n in ports.fleet.snapshot(s.reservation_settle)]
    if any(demand.cpu <= cpus * limit + 1e-9 and demand.memory <= memory * limit + 1e-9 for cpus, memory in sizes):
        return
    cpus, memory = max(sizes)
    raise NoCapacity(
        f"the algorithm declares {demand.cpu:g} cpu and {demand.memory:g} MiB, more than any node can hold "
        f"under the {s.threshold:g}% threshold (the largest node has {cpus:g} cpu and {memory:g} MiB); "
        "lower `cpu`/`memory` in algorithm.toml, or run larger nodes (DM_NODE_CPUS, DM_NODE_MEMORY)"
    )


def deploy(ports: Ports, request: DeployRequest) -> Doc:
    """Validate, decide where, and record the deployment already ``scheduled`` there in one
    registry write (its ``pending`` and ``scheduled`` events ride along), then dispatch it.

    The same request id gives back the first deployment (placed, if it still waits). With
    no room it is recorded ``pending`` with the reason; the placement reconciler adds a node
    (up to ``max_nodes``) and places it.
    """
    received = time.time()  # the pending event's time: placement latency is measured from it
    algorithm = ports.catalogue.algorithm(request.algorithm, request.version)
    validate_args(AlgorithmSpec.from_dict(algorithm["spec"]), request.args)
    check_args_storable(request.args)
    demand = Demand.from_dict(algorithm["spec"]["demand"])
    check_fits(ports, demand)
    with _placing(ports, demand) as (lock, node_id, reason, nodes):
        if node_id is None:
            reason = waiting_reason(ports, nodes)
        doc, created = _create(ports, request, algorithm, node_id, reason, received)
        if created and node_id is not None:
            apply_effects(ports, rule(D.PENDING, D.SCHEDULED, Actor.CONTROL).effects, doc, None,
                          run={"demand": demand, "lock": lock})  # fmt: skip
    if not created:  # a redelivery or a retry: go on from where the first stopped
        return place(ports, doc["_id"], doc)
    if node_id is None:
        return place_or_grow(ports, doc)
    return doc


def place_or_grow(ports: Ports, doc: Doc) -> Doc:
    """Place a waiting deployment; with no room, add a node (outside the placement lock, under
    the node manager's) and place it there while it starts."""
    placed = place(ports, doc["_id"], doc)
    if placed["state"] != D.PENDING:
        return placed
    if grow(ports, Demand.from_dict(placed["demand"])) is None:
        return placed
    return place(ports, placed["_id"], placed)


#: seconds the node manager's lock lives while a node is added
GROW_LOCK_SECONDS = 30.0


def grow(ports: Ports, demand: Demand) -> str | None:
    """Add a node for ``demand`` when none fits and ``max_nodes`` allows; its id, or None.
    One adder at a time (the node manager's lock): two deployers never add the last node twice."""
    s = ports.settings
    if not ports.provider.starts_nodes:
        return None
    token = ports.fleet.try_lock("nodes", GROW_LOCK_SECONDS)
    if token is None:
        return None  # another is adding one: the next pass places on it
    try:
        nodes = ports.fleet.snapshot(s.reservation_settle)
        if balancer.choose(nodes, demand, s.threshold, s.policy) is not None:
            return None  # room appeared meanwhile
        if len([n for n in nodes if n.state in ("up", "starting")]) >= s.max_nodes:
            return None
        return ports.provider.add_node(nodes)
    finally:
        ports.fleet.unlock("nodes", token)


def _create(
    ports: Ports, request: DeployRequest, algorithm: Doc, node_id: str | None, reason: str, received: float
) -> tuple[Doc, bool]:
    for _ in range(3):  # a clash of the random _id (not of the request id) makes a new one
        doc = new_deployment(request, algorithm, node=node_id, reason=reason, since=received)
        try:
            made, created = ports.store.create(doc)
        except Exception as exc:
            if "duplicate" not in str(exc).lower():
                raise
            continue
        made.pop("history", None)
        return made, created
    raise RuntimeError("could not record the deployment: three id clashes in a row")


def waiting_reason(ports: Ports, nodes: list[balancer.NodeView]) -> str:
    s = ports.settings
    live = [n for n in nodes if n.state in ("up", "starting")]
    more = (
        "a node is being added"
        if ports.provider.starts_nodes and len(live) < s.max_nodes
        else (f"max_nodes={s.max_nodes} reached" if ports.provider.starts_nodes else "the provider starts no nodes")
    )
    return f"waiting for room: {len(live)} node(s), none under {s.threshold:g}% with this demand; {more}"


def place(ports: Ports, dep_id: str, doc: Doc | None = None) -> Doc:
    """Place a ``pending`` or ``lost`` deployment and dispatch it; a no-op for any other state.

    ``doc`` is the deployment as the caller just read or made it (saves a read). No room:
    it stays (or becomes) ``pending`` with the reason; the placement reconciler adds a node.
    """
    doc = doc if doc is not None else ports.store.get(dep_id)
    if doc["state"] not in WAITING:
        return doc
    demand = Demand.from_dict(doc["demand"])
    with _placing(ports, demand) as (lock, node_id, reason, nodes):
        if node_id is None:
            reason = waiting_reason(ports, nodes)
            if doc["state"] == D.PENDING and doc.get("reason") == reason:
                return doc
            waiting = transition(
                ports, doc["_id"], D.PENDING, actor=Actor.CONTROL, expect=WAITING, generation=doc["generation"],
                reason=reason, current=doc,
            )  # fmt: skip
            return waiting or ports.store.get(doc["_id"])
        placed = transition(
            ports, dep_id, D.SCHEDULED, actor=Actor.CONTROL, expect=WAITING, generation=doc["generation"],
            reason=reason, current=doc, run={"demand": demand, "lock": lock},
            node=node_id, pid=None, scheduled_at=time.time(),
        )  # fmt: skip
        if placed is None:  # another deployer placed or stopped it first
            return ports.store.get(dep_id)
    return placed


#: deployments decided and written together by :func:`place_many` (one lock hold, one script,
#: one bulk write, one pipeline each)
PLACE_BATCH = 100
#: the policies whose choice the fleet makes in one script, for one deployment or many
BATCH_POLICIES = ("min", "max")


def place_many(
    ports: Ports, docs: list[Doc], lost: dict[str, str] | None = None, between: Callable[[], bool] | None = None
) -> list[Doc]:
    """Place many waiting deployments (a dead node's, a backlog) in few round trips: for each
    batch of :data:`PLACE_BATCH`, one script takes the placement lock and chooses a node for
    each, allocating as it goes so the next choice counts the ones before (never past the
    threshold, as one by one); one bulk write records them ``scheduled`` (a compare-and-set
    each); one pipeline releases the lock and sends the run orders. An allocation whose write
    was refused (the deployment moved on meanwhile) is released. What found no room goes
    through :func:`place_or_grow` one by one (which adds a node). Returns each of those given
    that was waiting, as it now stands, in the order given.

    ``lost``: the deployments are still active on a dead node (id -> why it is lost); each is
    ``lost`` and placed again in the same write (both events recorded), and one that finds no
    room is ``lost`` (in one write for the batch) before it goes one by one: a fail-over
    writes each deployment once, not twice.

    ``between``: called before each batch after the first (a mover extends its lock); when
    it returns False the rest are left as they are, and returned as given."""
    s = ports.settings
    waiting = [d for d in docs if d["state"] in WAITING or (lost is not None and d["_id"] in lost)]
    if s.policy not in BATCH_POLICIES or (lost is None and len(waiting) < 2):  # one by one
        return [place_or_grow(ports, d) for d in (waiting if lost is None else _lose(ports, waiting, lost))]
    out: list[Doc] = []
    for low in range(0, len(waiting), PLACE_BATCH):
        if low and between is not None and not between():
            return out + waiting[low:]
        batch = waiting[low : low + PLACE_BATCH]
        wants = [(d["_id"], Demand.from_dict(d["demand"]), int(d["generation"]) + 1) for d in batch]
        lock, picks = ports.fleet.place_many_lock(wants, s.threshold, s.policy, s.reservation_settle)
        chosen = [(d, node, score) for d, (node, score) in zip(batch, picks, strict=True) if node is not None]
        moved: dict[str, Doc] = {}
        try:
            now = time.time()
            each = [{"node": node, "reason": f"placed on node-{node} (load {score:.1f})", "pid": None,
                     "scheduled_at": now} for _, node, score in chosen]  # fmt: skip
            docs_chosen = [d for d, _, _ in chosen]
            # from a dead node: lost on the way, in the same write
            via = None if lost is None else D.LOST
            via_each = None if lost is None else [{"reason": lost[d["_id"]]} for d in docs_chosen]
            if docs_chosen:
                placed = transition_many(ports, docs_chosen, D.SCHEDULED, actor=Actor.CONTROL, reason="placed",
                                         each=each, lock=lock, via=via, via_each=via_each)  # fmt: skip
                moved = {d["_id"]: d for d in placed}
        finally:
            lock.release()
            for d, node, _ in chosen:  # refused (moved on meanwhile), or the write failed
                if d["_id"] not in moved:
                    try:
                        ports.fleet.release(str(node), d["_id"])
                    except Exception as exc:  # the allocations reconciler rebuilds it from the registry
                        if not ports.is_outage(exc):
                            raise
        roomless = [d for d, (pick, _) in zip(batch, picks, strict=True) if pick is None]
        if lost is not None:  # still on the dead node: lost first, then one by one
            now_lost = {d["_id"]: d for d in _lose(ports, roomless, lost)}
            roomless = [now_lost[d["_id"]] for d in roomless if d["_id"] in now_lost]
        placed_alone = {d["_id"]: place_or_grow(ports, d) for d in roomless}
        for d in batch:
            out.append(placed_alone.get(d["_id"]) or moved.get(d["_id"]) or ports.store.get(d["_id"]))
    return out


def _lose(ports: Ports, docs: list[Doc], why: dict[str, str]) -> list[Doc]:
    """Deployments still active on a dead node made ``lost`` (one write); those moved."""
    if not docs:
        return []
    return transition_many(ports, docs, D.LOST, actor=Actor.CONTROL, reason="lost",
                           each=[{"reason": why[d["_id"]]} for d in docs])  # fmt: skip


def stop(ports: Ports, dep_id: str, reason: str = "stopped by request") -> Doc:
    """Stop a deployment: at once when it holds no node, else through its node."""
    for _ in range(10):
        doc = ports.store.get(dep_id)
        if doc["state"] in FINAL or doc["state"] == D.STOPPING:
            return doc
        if doc["state"] in WAITING:
            done = transition(ports, doc["_id"], D.STOPPED, actor=Actor.CONTROL, expect=WAITING, reason=reason,
                              generation=doc["generation"])  # fmt: skip
        else:
            done = transition(ports, doc["_id"], D.STOPPING, actor=Actor.CONTROL, expect=ACTIVE, reason=reason,
                              generation=doc["generation"])  # fmt: skip
        if done is not None:
            return done
    return ports.store.get(dep_id)  # it kept moving: tell what it is now


__all__ = ["Effect", "check_fits", "deploy", "grow", "place", "place_or_grow", "public", "stop"]
