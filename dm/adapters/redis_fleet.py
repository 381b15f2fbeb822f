"""The fleet port on Redis: node hashes, leases, presence, allocations, locks.

Thin: each method is one or two calls of :mod:`dm.fleet`, whose scripts live in
``dm/lua``. Key names come from :mod:`dm.keys`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from redis.exceptions import LockError

from dm import fleet
from dm import keys as k
from dm.balancer import NodeView
from dm.models import Demand

#: seconds the placement lock lives (a deployer that dies holding it holds placements up this long)
LOCK_TTL = 30.0
#: seconds a deployer waits for the placement lock before it gives up
LOCK_WAIT = 60.0


class PlacementLock:
    """The placement lock, held as a token; released once: in the dispatcher's pipeline, or at the end."""

    def __init__(self, r: redis.Redis, token: str) -> None:
        self.r, self.token, self.released = r, token, False

    def release(self, pipe: Any = None) -> None:
        if not self.released:
            fleet.unlock(self.r, self.token, pipe)
            self.released = True


class RedisFleet:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def place_lock(
        self, demand: Demand, threshold: float, policy: str, settle: float
    ) -> tuple[PlacementLock, str | None, float | None]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            if policy in fleet.DECIDE_POLICIES:
                answer = fleet.decide(self.r, token, demand, threshold, policy, settle, LOCK_TTL)
            else:
                taken = self.r.set(k.PLACEMENT_LOCK, token, nx=True, px=int(LOCK_TTL * 1000))
                answer = ["read"] if taken else ["locked"]
            if answer[0] != "locked":
                break
            if time.monotonic() > deadline:
                raise LockError(f"the placement lock {k.PLACEMENT_LOCK} was held for over {LOCK_WAIT:g}s; try again")
            time.sleep(0.002)
        lock = PlacementLock(self.r, token)
        if answer[0] == "ok":
            return lock, answer[1], float(answer[2])
        return lock, None, None

    def place_many_lock(
        self, wants: list[tuple[str, Demand, int]], threshold: float, policy: str, settle: float
    ) -> tuple[PlacementLock, list[tuple[str | None, float]]]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT
        while (answer := fleet.decide_many(self.r, token, wants, threshold, policy, settle, LOCK_TTL)) is None:
            if time.monotonic() > deadline:
                raise LockError(f"the placement lock {k.PLACEMENT_LOCK} was held for over {LOCK_WAIT:g}s; try again")
            time.sleep(0.002)
        return PlacementLock(self.r, token), [(node or None, score) for node, score in answer]

    def snapshot(self, settle: float) -> list[NodeView]:
        return fleet.snapshot(self.r, settle)

    def node_hashes(self) -> dict[str, dict[str, str]]:
        return fleet.node_hashes(self.r)

    def dead_nodes(self) -> list[str]:
        return fleet.dead_nodes(self.r)

    def live_counts(self) -> list[tuple[str, str, int]]:
        return fleet.live_counts(self.r)

    def leases(self, node_ids: Iterable[str]) -> dict[str, bool]:
        return fleet.leases(self.r, node_ids)

    def observe(self) -> dict[str, dict[str, str]]:
        return fleet.observe(self.r)

    def present(self) -> set[str] | None:
        return fleet.present_nodes(self.r)

    def server_id(self) -> str:
        return str(self.r.info("server").get("run_id", ""))

    def set_state(self, node_id: str, state: str) -> None:
        fleet.set_state(self.r, node_id, state)

    def release(self, node_id: str, dep_id: str) -> None:
        fleet.release(self.r, node_id, dep_id)

    def clear_allocations(self, node_id: str) -> None:
        fleet.clear_allocations(self.r, node_id)

    def allocations(self, node_id: str) -> dict[str, dict[str, Any]]:
        return fleet.allocations(self.r, node_id)

    def allocate(self, node_id: str, dep_id: str, demand: Demand) -> None:
        fleet.allocate(self.r, node_id, dep_id, demand)

    def register(self, node_id: str, *, cpus: float, memory: float, state: str, host: str = "") -> None:
        fleet.register_node(self.r, node_id, cpus=cpus, memory=memory, state=state, host=host)

    def next_node_id(self) -> str:
        return str(self.r.incr(k.NODE_SEQ))

    def try_lock(self, name: str, seconds: float) -> str | None:
        token = uuid.uuid4().hex
        taken = self.r.set(k.RECONCILE_LOCK.format(name), token, nx=True, px=max(1, int(seconds * 1000)))
        return token if taken else None

    def unlock(self, name: str, token: str) -> None:
        fleet.unlock(self.r, token, key=k.RECONCILE_LOCK.format(name))

    def extend_lock(self, name: str, token: str, seconds: float) -> bool:
        return fleet.extend_lock(self.r, token, seconds, key=k.RECONCILE_LOCK.format(name))

    def marks(self, name: str) -> dict[str, str]:
        return self.r.hgetall(name)  # type: ignore[return-value]

    def set_marks(self, name: str, values: dict[str, str], drop: Iterable[str] = ()) -> None:
        gone = list(drop)
        if not values and not gone:
            return
        pipe = self.r.pipeline()
        if gone:
            pipe.hdel(name, *gone)
        if values:
            pipe.hset(name, mapping=values)  # type: ignore[arg-type]
        pipe.execute()

    def get(self, key: str) -> str | None:
        value = self.r.get(key)
        return None if value is None else str(value)

    def put(self, key: str, value: str) -> None:
        self.r.set(key, value)
