"""Retention: what the registry and the fleet view forget after ``DM_RETENTION`` (default 7 days).

A periodic task (``dm.retention``, beat, every ``DM_RETENTION_INTERVAL`` s, default 60)
deletes, in bounded batches through indexed queries:

- finished deployments (``succeeded``, ``failed``, ``stopped``) last changed before the
  cutoff, and their events (index ``(state, updated_at)`` on deployments; events by their
  ``(deployment_id, rev)`` index), taken off the relay's counts of deployments per state
  (:mod:`dm.relay`). An active deployment is never touched, however old;
- nodes ``dead`` or ``stopped`` since before the cutoff: their registry record, and their
  Redis hash, lease, allocations and membership of the nodes set (the fleet view).

The node side (logs, work dirs and package cache of finished deployments) is pruned by
each node agent itself: :mod:`workers.housekeeping`. One sweep runs at a time (a lock);
another beat's sweep meanwhile is skipped.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dm import fleet
from dm import keys as k
from dm.models import FINAL_STATES
from dm.registry.base import chunks, find_in

if TYPE_CHECKING:
    from dm.control import Control
    from dm.registry import Registry

log = logging.getLogger(__name__)

#: lock held by the one sweep that runs
RETENTION_LOCK = k.RETENTION_LOCK
#: seconds the lock lives (a sweep that dies holding it delays the next one this long)
LOCK_TIMEOUT = 120.0
#: deployments deleted per query, and batches per sweep: a sweep stays short, the rest waits
BATCH = 1000
MAX_BATCHES = 10
#: node states whose records go after the retention
GONE_NODE_STATES = ("dead", "stopped")

_indexed: set[int] = set()


def ensure_index(registry: Registry) -> None:
    """The index the sweep's query uses (made once per registry and process)."""
    if id(registry) not in _indexed:
        registry.deployments.create_index([("state", 1), ("updated_at", 1)])
        _indexed.add(id(registry))


def sweep(ctl: Control, now: float | None = None) -> dict[str, Any]:
    """One pass; returns what it deleted (for logs and tests)."""
    lock = ctl.redis.lock(RETENTION_LOCK, timeout=LOCK_TIMEOUT, blocking=False)
    if not lock.acquire():
        return {"skipped": True}
    try:
        cutoff = (time.time() if now is None else now) - ctl.settings.retention
        deployments, events = prune_deployments(ctl.registry, cutoff)
        nodes = prune_nodes(ctl, cutoff)
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: the next sweep takes it anew
            pass
    if deployments or nodes:
        log.info("retention: deleted %d deployments, %d events, %d nodes", deployments, events, len(nodes))
    return {"deployments": deployments, "events": events, "nodes": nodes}


def prune_deployments(registry: Registry, cutoff: float) -> tuple[int, int]:
    """Delete finished deployments last changed before ``cutoff``, and their events."""
    ensure_index(registry)
    deleted = events = 0
    for state in FINAL_STATES:  # one equality each: every planner takes the index for it
        query = {"state": state, "updated_at": {"$lt": cutoff}}
        for _ in range(MAX_BATCHES):
            ids = [d["_id"] for d in registry.deployments.find(query, {"_id": 1}).limit(BATCH)]
            if not ids:
                break
            # events first: a sweep cut short leaves a deployment with fewer events, never events of none
            for part in chunks(ids):
                events += registry.events.delete_many({"deployment_id": {"$in": part}}).deleted_count
                gone = registry.deployments.delete_many({"_id": {"$in": part}, **query}).deleted_count
                if gone:
                    registry.uncount(state, gone)
                deleted += gone
            if len(ids) < BATCH:
                break
    return deleted, events


def prune_nodes(ctl: Control, cutoff: float) -> list[str]:
    """Drop nodes dead or stopped since before ``cutoff`` from the registry and the fleet view."""
    gone: list[str] = []
    for state in GONE_NODE_STATES:
        query = {"state": state, "updated_at": {"$lt": cutoff}}
        ids = [n["_id"] for n in ctl.registry.nodes.find(query, {"_id": 1}).limit(BATCH)]
        if ids:
            for part in chunks(ids):
                ctl.registry.nodes.delete_many({"_id": {"$in": part}, **query})
            gone += ids
    # the fleet view may hold a node the registry no longer has (or never had): by its own record
    hashes = fleet.node_hashes(ctl.redis)
    known = {n["_id"] for n in find_in(ctl.registry.nodes, hashes, {"_id": 1})}
    for node_id, h in hashes.items():
        stale = h.get("state") in GONE_NODE_STATES and _float(h.get("ts")) < cutoff and node_id not in known
        if (node_id in gone or stale) and not ctl.redis.exists(k.LEASE.format(node_id)):
            fleet.remove_node(ctl.redis, node_id)
            if node_id not in gone:
                gone.append(node_id)
    return gone


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
