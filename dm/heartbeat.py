"""The heartbeat check, run by beat every ``heartbeat_interval``.

- a node whose lease expired (or whose agent process the local provider saw exit)
  becomes ``dead``, and each of its active deployments ``lost`` and placed again;
- a deployment ``scheduled`` longer than ``start_timeout`` is placed again;
- deployments waiting for room are tried again;
- idle nodes above ``min_nodes`` for ``idle_timeout`` are stopped.

Several beats and control workers may run it at once: a lock keeps one check at a
time, and each step is a compare-and-set, so one failure leads to one re-placement.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import LockError

from dm import constants as c
from dm import deployer, fleet, node_manager
from dm.control import Control
from dm.models import ACTIVE_STATES, LOST, PENDING, SCHEDULED, STOPPED, STOPPING
from dm.node_manager import DEAD, LIVE_STATES, STARTING, UP
from dm.node_manager import STOPPING as NODE_STOPPING

log = logging.getLogger(__name__)

#: seconds a ``starting`` node may take to publish its first lease
NODE_START_GRACE = 30.0
#: Redis hash: node id -> time it was first seen idle
IDLE_KEY = "dm:idle_since"
#: Redis hash: node id -> time its presence connection was first seen missing
ABSENT_KEY = "dm:absent_since"
#: hash: node id -> run_id of the Redis server in which its presence connection was last seen
PRESENT_KEY = "dm:present_in"
#: seconds the heartbeat lock lives: a check cut short by a Redis restart (the lock kept
#: in its append-only file) must not hold up the next ones for long
LOCK_TIMEOUT = 10


def check(ctl: Control, now: float | None = None) -> dict[str, Any]:
    """One pass; returns what it did (for logs and tests)."""
    lock = ctl.redis.lock(c.HEARTBEAT_LOCK, timeout=LOCK_TIMEOUT, blocking=False)
    if not lock.acquire():
        return {"skipped": True}
    try:
        now = time.time() if now is None else now
        dead = find_dead_nodes(ctl, now)
        failed_over = sum(fail_over(ctl, node_id, reason) for node_id, reason in dead.items())
        failed_over += finish_fail_overs(ctl)
        timed_out = retry_unstarted(ctl, now)
        placed = deployer.place_pending(ctl)
        stopped = scale_in(ctl, now)
        ctl.redis.set("dm:heartbeat:last", time.time())  # dm.metrics.HEARTBEAT_LAST_KEY: the check-lag metric
        return {"dead": sorted(dead), "failed_over": failed_over, "timed_out": timed_out,
                "placed": placed, "scaled_in": stopped}  # fmt: skip
    finally:
        try:
            lock.release()
        except LockError:
            pass


def find_dead_nodes(ctl: Control, now: float) -> dict[str, str]:
    """Live nodes whose lease is gone (or whose local agent process exited), with the reason."""
    nodes = fleet.node_hashes(ctl.redis)
    live = {node_id: h for node_id, h in nodes.items() if h.get("state") in (*LIVE_STATES, NODE_STOPPING)}
    leases = fleet.leases(ctl.redis, live)
    exited = set(node_manager.provider(ctl.settings.provider).exited())
    gone = _connection_gone(ctl, [n for n, h in live.items() if h.get("state") == UP], now)
    dead = {}
    for node_id, h in live.items():
        if node_id in exited:
            dead[node_id] = f"node-{node_id} agent process exited"
        elif node_id in gone:
            dead[node_id] = f"node-{node_id} connection to Redis closed"
        elif not leases[node_id]:
            if "ts" not in h and h.get("state") == STARTING:
                doc = ctl.registry.get_node(node_id)
                if doc is not None and now - doc.get("created_at", now) < NODE_START_GRACE:
                    continue  # still starting: it has not published its first lease yet
                dead[node_id] = f"node-{node_id} did not start within {NODE_START_GRACE:g}s"
            else:
                dead[node_id] = f"node-{node_id} lease expired"
    return dead


def _connection_gone(ctl: Control, up: list[str], now: float) -> set[str]:
    """Up nodes whose presence connection was missing in this check and the one before.

    A process that dies closes its sockets at once, so this sees a ``kill -9`` well
    before the lease expires; two checks in a row rule out a reconnect in progress. A
    node is judged so only once it has been seen present in this run of the Redis server
    (its ``run_id``): right after a Redis restart every node is still reconnecting.
    """
    present = fleet.present_nodes(ctl.redis)
    if present is None:
        return set()
    run_id = str(ctl.redis.info("server").get("run_id", ""))
    here = {node_id: run_id for node_id in up if node_id in present}
    if here:
        ctl.redis.hset(PRESENT_KEY, mapping=here)  # type: ignore[arg-type]
    known = ctl.redis.hgetall(PRESENT_KEY)
    missing = [node_id for node_id in up if node_id not in present and known.get(node_id) == run_id]
    seen = ctl.redis.hgetall(ABSENT_KEY)
    stale = [node_id for node_id in seen if node_id not in missing]
    pipe = ctl.redis.pipeline()
    if stale:
        pipe.hdel(ABSENT_KEY, *stale)
    for node_id in missing:
        pipe.hsetnx(ABSENT_KEY, node_id, now)
    pipe.execute()
    return {node_id for node_id in missing if node_id in seen}


def fail_over(ctl: Control, node_id: str, reason: str) -> int:
    """Mark a node dead and place its deployments again; returns how many moved."""
    if not ctl.registry.set_node_state(node_id, DEAD, expect=(*LIVE_STATES, NODE_STOPPING)):
        fleet.set_state(ctl.redis, node_id, DEAD)
        return 0  # another checker got there first
    fleet.set_state(ctl.redis, node_id, DEAD)
    log.warning("%s: failing over its deployments", reason)
    return move_deployments(ctl, node_id, reason)


def move_deployments(ctl: Control, node_id: str, reason: str) -> int:
    """Each active deployment of a dead node ``lost`` and placed again (compare-and-sets all)."""
    moved = 0
    for doc in ctl.registry.list_deployments([*ACTIVE_STATES, STOPPING], node=node_id):
        if doc["state"] == STOPPING:
            deployer.transition(ctl, doc["_id"], STOPPED, expect=[STOPPING], reason=f"stopped ({reason})")
            continue
        lost = deployer.transition(
            ctl, doc["_id"], LOST, expect=ACTIVE_STATES, generation=doc["generation"], reason=reason
        )
        if lost is not None:
            deployer.place(ctl, doc["_id"], lost)
            moved += 1
    fleet.clear_allocations(ctl.redis, node_id)
    return moved


def finish_fail_overs(ctl: Control) -> int:
    """Move what a fail-over cut short (by an outage of MongoDB or Redis) left on a dead node."""
    dead = [node_id for node_id, h in fleet.node_hashes(ctl.redis).items() if h.get("state") == DEAD]
    if not dead:
        return 0
    query = {"node": {"$in": dead}, "state": {"$in": [*ACTIVE_STATES, STOPPING]}}
    return sum(
        move_deployments(ctl, node_id, f"node-{node_id} is dead")
        for node_id in ctl.registry.deployments.distinct("node", query)
    )


def retry_unstarted(ctl: Control, now: float) -> int:
    """Place again what sat ``scheduled`` past the start timeout (its task never ran)."""
    limit = now - ctl.settings.start_timeout
    stale = ctl.registry.deployments.find({"state": SCHEDULED, "scheduled_at": {"$lt": limit}})
    count = 0
    for doc in stale:
        reason = f"not started on node-{doc['node']} within {ctl.settings.start_timeout:g}s"
        if deployer.transition(ctl, doc["_id"], LOST, expect=[SCHEDULED], generation=doc["generation"], reason=reason):
            deployer.place(ctl, doc["_id"])
            count += 1
    return count


def scale_in(ctl: Control, now: float) -> list[str]:
    """Stop nodes above ``min_nodes`` that have run nothing for ``idle_timeout``."""
    s = ctl.settings
    views = [v for v in fleet.snapshot(ctl.redis, s.reservation_settle, now) if v.state in LIVE_STATES]
    idle_since = {k: float(v) for k, v in ctl.redis.hgetall(IDLE_KEY).items()}  # type: ignore[union-attr]
    busy = [v.id for v in views if v.deployments > 0 or v.state == STARTING]
    if busy:
        ctl.redis.hdel(IDLE_KEY, *busy)
    if ctl.registry.deployments.count_documents({"state": {"$in": [PENDING, LOST]}}, limit=1):
        return []  # work is waiting for room: keep every node
    idle = sorted((v for v in views if v.id not in busy), key=lambda v: idle_since.get(v.id, now))
    stopped: list[str] = []
    for view in idle:
        since = idle_since.get(view.id)
        if since is None:
            ctl.redis.hset(IDLE_KEY, view.id, now)
        elif (
            now - since >= s.idle_timeout
            and len(views) - len(stopped) > s.min_nodes
            and node_manager.stop_node(ctl, view.id)  # False for a node started by hand
        ):
            ctl.redis.hdel(IDLE_KEY, view.id)
            stopped.append(view.id)
    return stopped
