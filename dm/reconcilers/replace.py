"""The placement reconciler: work that should run somewhere and does not, placed.

- deployments still active on a ``dead`` node (a fail-over cut short by an outage) are
  ``lost`` and placed again;
- a deployment ``scheduled`` longer than ``start_timeout`` (its order was lost, its node
  never started it) is ``lost`` and placed again;
- ``pending`` and ``lost`` deployments are placed; when none fits, a node is added (up to
  ``max_nodes``) and they are placed on it while it starts.

A backlog is placed in batches (one script, one bulk write, one pipeline per hundred); one
that cannot fit never holds up the others; a demand that did not fit in this pass is not
tried again in it for deployments that ask as much or more (they cannot fit either), so a
pass costs one failed decision per size.
"""

from __future__ import annotations

import time
from typing import Any

from dm import deployer
from dm import keys as k
from dm.lifecycle import Actor, D, transition
from dm.models import Demand
from dm.ports import Ports
from dm.reconcilers.detect import move_deployments

#: deployments looked at per pass, of each kind
BATCH = 500
#: seconds a ``lost`` deployment is left to whoever made it lost (a fail-over places what it
#: marks, in batches; a node that stops asks for each): placing it here too meanwhile only
#: doubles the work (both decide, one write wins). Past this, it is placed here.
LOST_GRACE = 5.0


def run(ports: Ports, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "finished_fail_overs": finish_fail_overs(ports, now),
        "timed_out": retry_unstarted(ports, now),
        "placed": place_waiting(ports),
    }


def finish_fail_overs(ports: Ports, now: float | None = None) -> int:
    """Move what a fail-over left on a dead node: what an outage of MongoDB or Redis cut short,
    and what asked to keep running on a cut-off node once its ``keep_for`` has passed."""
    now = time.time() if now is None else now
    skip = ports.fleet.marks(k.MOVED_OFF)  # a node once cleared is not read again
    skip |= {n: u for n, u in ports.fleet.marks(k.MOVING).items() if float(u) > now}  # nor one being moved
    dead = [n for n in ports.fleet.dead_nodes() if n not in skip]
    if not dead:
        return 0
    holding = ports.store.nodes_holding(dead)
    cleared = {n: repr(now) for n in dead if n not in holding}
    if cleared:
        ports.fleet.set_marks(k.MOVED_OFF, cleared)
    if not holding:
        return 0
    since = ports.fleet.marks(k.DEAD_SINCE)
    moved = 0
    for node_id in holding:
        held = float(since[node_id]) if node_id in since else None
        reason = f"node-{node_id} is dead" + (" (its deployments' keep_for has passed)" if held else "")
        moved += move_deployments(ports, node_id, reason, held_since=held, now=now)
    return moved


def retry_unstarted(ports: Ports, now: float) -> int:
    """Place again what sat ``scheduled`` past the start timeout (its order never ran)."""
    timeout = ports.settings.start_timeout
    count = 0
    for doc in ports.store.unstarted(now - timeout, BATCH):
        reason = f"not started on node-{doc['node']} within {timeout:g}s"
        lost = transition(ports, doc["_id"], D.LOST, actor=Actor.CONTROL, expect=[D.SCHEDULED],
                          generation=doc["generation"], reason=reason, current=doc)  # fmt: skip
        if lost is not None:
            deployer.place_or_grow(ports, lost)
            count += 1
    return count


def place_waiting(ports: Ports) -> int:
    """Place ``pending`` and ``lost`` deployments; returns how many were placed. A backlog goes
    in batches (:func:`dm.deployer.place_many`) while they find room; once one does not, the
    rest go one by one, skipping demands as large as one that found none."""
    now = time.time()
    # while a fail-over places its node's deployments, its lost ones are its own: not even read
    moving = any(float(until) > now for until in ports.fleet.marks(k.MOVING).values())
    waiting = [d for d in ports.store.waiting(BATCH, lost=not moving)
               if d["state"] != D.LOST or now - float(d.get("updated_at") or 0) >= LOST_GRACE]  # fmt: skip
    placed = 0
    misfits: list[Demand] = []  # demands that found no room in this pass, even after adding a node
    start = 0
    while start < len(waiting):
        doc = waiting[start]
        if not misfits and len(waiting) - start > 1:
            batch = waiting[start : start + deployer.PLACE_BATCH]
            results = deployer.place_many(ports, batch)
            placed += sum(1 for d in results if d["state"] == D.SCHEDULED)
            misfits += [Demand.from_dict(d["demand"]) for d in results if d["state"] == D.PENDING]
            start += len(batch)
            continue
        demand = Demand.from_dict(doc["demand"])
        start += 1
        if any(demand.cpu >= m.cpu and demand.memory >= m.memory for m in misfits):
            continue
        if deployer.place_or_grow(ports, doc)["state"] == D.SCHEDULED:
            placed += 1
        else:
            misfits.append(demand)
    return placed
