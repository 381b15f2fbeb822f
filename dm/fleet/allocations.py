"""What is placed on each node (allocations, their running totals and the recent, reserved
ones), the placement index and the one-call decision, and the snapshot placement reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from dm import constants as c
from dm import keys as k
from dm.balancer import NodeView
from dm.fleet.scripts import _ALLOCATE, _DECIDE, _DECIDE_MANY, _EXTEND, _INDEX, _RELEASE, _SNAPSHOT, _UNLOCK, _script
from dm.models import Demand

#: seconds a reservation counts after the node's last sample, as the index computes scores
#: (placement passes its setting; the index uses the same, see ``reindex``)
INDEX_SETTLE = c.DEFAULT_RESERVATION_SETTLE


def reindex(r: redis.Redis, node_ids: Iterable[str], pipe: Any = None, settle: float = INDEX_SETTLE) -> None:
    """Bring the placement index up to date for these nodes (on ``pipe`` if given)."""
    ids = list(node_ids)
    if ids:
        args = [k.NODE, k.ALLOC, k.RECENT, settle, *ids]
        _script(r, _INDEX)(keys=[k.PLACEMENT_INDEX, k.PLACEMENT_SETTLE], args=args, client=pipe)


#: policies the one-call decision knows (``p2c`` reads the fleet and asks dm.balancer)
DECIDE_POLICIES = ("min", "max")


def decide(
    r: redis.Redis, token: str, demand: Demand, threshold: float, policy: str, settle: float, lock_seconds: float
) -> list[str]:
    """Take the placement lock (as ``token``) and choose a node in one call; see ``_DECIDE``."""
    keys = [k.NODES, k.PLACEMENT_LOCK, k.PLACEMENT_INDEX, k.PLACEMENT_SETTLE]
    args = [token, int(lock_seconds * 1000), settle, repr(demand.cpu), repr(demand.memory), threshold, policy,
            k.NODE, k.ALLOC, k.RECENT]  # fmt: skip
    return [str(x) for x in _script(r, _DECIDE)(keys=keys, args=args)]


def decide_many(
    r: redis.Redis,
    token: str,
    wants: list[tuple[str, Demand, int]],
    threshold: float,
    policy: str,
    settle: float,
    lock_seconds: float,
) -> list[tuple[str, float]] | None:
    """Take the placement lock (as ``token``) and place each (deployment id, demand, generation
    it is placed in) in one call,
    allocating as it goes; see ``_DECIDE_MANY``. None when the lock is held; else for each in
    order (node id, score), or ("", 0.0) where none fits."""
    keys = [k.NODES, k.PLACEMENT_LOCK, k.PLACEMENT_INDEX, k.PLACEMENT_SETTLE]
    args: list[Any] = [token, int(lock_seconds * 1000), settle, threshold, policy, k.NODE, k.ALLOC, k.RECENT,
                       repr(time.time())]  # fmt: skip
    for dep_id, demand, generation in wants:
        args += [dep_id, repr(demand.cpu), repr(demand.memory), generation]
    answer = [str(x) for x in _script(r, _DECIDE_MANY)(keys=keys, args=args)]
    if answer[0] == "locked":
        return None
    rest = answer[1:]
    return [(rest[i], float(rest[i + 1]) if rest[i + 1] else 0.0) for i in range(0, len(rest), 2)]


def unlock(r: redis.Redis, token: str, pipe: Any = None, key: str = k.PLACEMENT_LOCK) -> None:
    """Release a lock taken as ``token`` (the placement lock unless ``key``; on ``pipe`` if given)."""
    _script(r, _UNLOCK)(keys=[key], args=[token], client=pipe)


def extend_lock(r: redis.Redis, token: str, seconds: float, key: str) -> bool:
    """Hold a lock taken as ``token`` for ``seconds`` more; False when it is no longer this token's."""
    return bool(_script(r, _EXTEND)(keys=[key], args=[token, max(1, int(seconds * 1000))]))


def snapshot(r: redis.Redis, settle: float, now: float | None = None) -> list[NodeView]:
    """Every registered node as the balancer sees it (one script call)."""
    del now  # the reserved figure depends on each node's sample time, not on the clock
    rows = _script(r, _SNAPSHOT)(keys=[k.NODES], args=[settle, k.NODE, k.ALLOC, k.RECENT])
    views = []
    for node_id, cpus, memory, state, cpu, ram, alloc_cpu, alloc_memory, alloc_n, res_cpu, res_memory in sorted(
        rows, key=lambda row: row[0]
    ):
        if cpus is None or memory is None:
            continue  # not registered (only metrics left of it)
        views.append(
            NodeView(
                id=node_id,
                state=state or "starting",
                cpus=float(cpus),
                memory=float(memory),
                cpu=float(cpu or 0.0),
                ram=float(ram or 0.0),
                # running totals: rounded, so adding and taking away the same demand leaves 0
                committed_cpu=max(0.0, round(float(alloc_cpu or 0.0), 6)),
                committed_memory=max(0.0, round(float(alloc_memory or 0.0), 6)),
                reserved_cpu=max(0.0, round(float(res_cpu), 6)),
                reserved_memory=max(0.0, round(float(res_memory), 6)),
                deployments=int(alloc_n or 0),
            )
        )
    return views


def allocate(
    r: redis.Redis, node_id: str, dep_id: str, demand: Demand, pipe: Any = None, generation: int | None = None
) -> None:
    """Record a deployment's demand on a node (on ``pipe``, a pipeline of ``r``, if given), and
    the generation placed there when known (the node's ownership check reads it)."""
    now = time.time()
    record: dict[str, Any] = {"cpu": demand.cpu, "memory": demand.memory, "ts": now}
    if generation is not None:
        record["gen"] = generation
    alloc = json.dumps(record)
    keys = [k.ALLOC.format(node_id), k.NODE.format(node_id), k.RECENT.format(node_id)]
    _script(r, _ALLOCATE)(
        keys=keys, args=[dep_id, repr(demand.cpu), repr(demand.memory), repr(now), alloc], client=pipe
    )
    reindex(r, [node_id], pipe)


def release(r: redis.Redis, node_id: str, dep_id: str) -> None:
    keys = [k.ALLOC.format(node_id), k.NODE.format(node_id), k.RECENT.format(node_id)]
    pipe = r.pipeline(transaction=False)
    _script(r, _RELEASE)(keys=keys, args=[dep_id], client=pipe)
    reindex(r, [node_id], pipe)
    pipe.execute()


def clear_allocations(r: redis.Redis, node_id: str) -> None:
    """Forget every allocation of a node (it died; its deployments are placed elsewhere)."""
    pipe = r.pipeline()
    pipe.delete(k.ALLOC.format(node_id), k.RECENT.format(node_id))
    pipe.hdel(k.NODE.format(node_id), "alloc_cpu", "alloc_memory", "alloc_n", "res_cpu", "res_memory")
    reindex(r, [node_id], pipe)
    pipe.execute()


def allocations(r: redis.Redis, node_id: str) -> dict[str, dict[str, Any]]:
    raw: dict[str, str] = r.hgetall(k.ALLOC.format(node_id))  # type: ignore[assignment]
    return {dep_id: json.loads(value) for dep_id, value in raw.items()}
