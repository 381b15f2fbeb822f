"""The fleet's hot state in Redis: node capacity and metrics, leases, allocations.

Placement reads everything it needs here in one script call; MongoDB keeps the
durable record. An allocation is the declared demand of a deployment placed on a
node; it counts as *reserved* on top of measured usage until the node's metrics
have had time to show it. Each node's hash keeps running totals of its allocations
(``alloc_cpu``, ``alloc_memory``, ``alloc_n``), and a sorted set its recent ones, so a
snapshot costs the same with 10 deployments as with 10,000.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from dm import constants as c
from dm import keys as k
from dm import redis_conn
from dm.balancer import NodeView
from dm.models import Demand, MetricsSample

_clients: dict[str, redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    """One client (a connection pool) per URL and process."""
    client = _clients.get(url)
    if client is None:
        # a Sentinel URL gives a client of the current master (dm.redis_conn)
        client = redis_conn.client(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=3, health_check_interval=10
        )
        _clients[url] = client
    return client


def register_node(
    r: redis.Redis, node_id: str, *, cpus: float, memory: float, state: str, host: str = "", address: str = ""
) -> None:
    pipe = r.pipeline()
    pipe.hset(
        k.NODE.format(node_id),
        # since: when it was registered (a starting node has that long to publish its first lease)
        mapping={
            "cpus": cpus,
            "memory": memory,
            "state": str(state),
            "host": host,
            "address": address,
            "since": repr(time.time()),
        },
    )
    pipe.sadd(k.NODES, node_id)
    reindex(r, [node_id], pipe)
    pipe.execute()


def set_state(r: redis.Redis, node_id: str, state: str) -> None:
    pipe = r.pipeline()
    pipe.hset(k.NODE.format(node_id), "state", str(state))
    reindex(r, [node_id], pipe)
    pipe.execute()


def remove_node(r: redis.Redis, node_id: str) -> None:
    pipe = r.pipeline()
    pipe.srem(k.NODES, node_id)
    pipe.zrem(k.PLACEMENT_INDEX, node_id)
    pipe.delete(k.NODE.format(node_id), k.ALLOC.format(node_id), k.LEASE.format(node_id),
                k.RECENT.format(node_id))  # fmt: skip
    pipe.execute()


def publish(r: redis.Redis, sample: MetricsSample, lease_ttl: float, token: str) -> str | None:
    """Publish a metrics sample and renew the node's lease (one round trip); returns the
    node's state as the control plane sees it (``dead`` tells it that it was replaced)."""
    return publish_many(r, [sample], lease_ttl, token)[sample.node_id]


def publish_many(r: redis.Redis, samples: list[MetricsSample], lease_ttl: float, token: str) -> dict[str, str | None]:
    """:func:`publish` for many nodes in one round trip (hollow nodes): node id -> its state."""
    pipe = r.pipeline(transaction=False)
    for sample in samples:
        key = k.NODE.format(sample.node_id)
        pipe.hset(key, mapping={"cpu": sample.cpu, "ram": sample.ram, "ts": sample.ts})
        pipe.set(k.LEASE.format(sample.node_id), token, px=int(lease_ttl * 1000))
        pipe.hget(key, "state")
        reindex(r, [sample.node_id], pipe)
    replies = pipe.execute()
    return {s.node_id: replies[4 * i + 2] for i, s in enumerate(samples)}


#: a presence connection's name in CLIENT LIST: ``name=dm-node-<id>``
_PRESENCE_NAME = re.compile(r" name=dm-node-([^ ]+)")  # plain: a \b or \S makes it 20 times slower


def presence_name(node_id: str) -> str:
    """The Redis client name of a node's presence connection."""
    return f"dm-node-{node_id}"


def present_nodes(r: redis.Redis) -> set[str] | None:
    """Node ids with a presence connection open, or None when CLIENT LIST is not allowed."""
    try:
        raw = r.execute_command("CLIENT", "LIST")  # as two words: no parsing callback
    except redis.RedisError:
        return None
    # the raw reply, not redis-py's parse of every field of every client: a tenth of the time
    text = raw if isinstance(raw, str) else bytes(raw).decode()
    return set(_PRESENCE_NAME.findall(text))


def leases(r: redis.Redis, node_ids: Iterable[str]) -> dict[str, bool]:
    ids = list(node_ids)
    pipe = r.pipeline()
    for node_id in ids:
        pipe.exists(k.LEASE.format(node_id))
    return {node_id: bool(alive) for node_id, alive in zip(ids, pipe.execute(), strict=True)}


def node_ids(r: redis.Redis) -> list[str]:
    return sorted(r.smembers(k.NODES))  # type: ignore[arg-type]


def node_hashes(r: redis.Redis) -> dict[str, dict[str, str]]:
    ids = node_ids(r)
    pipe = r.pipeline()
    for node_id in ids:
        pipe.hgetall(k.NODE.format(node_id))
    return dict(zip(ids, pipe.execute(), strict=True))


def _lua(name: str, prelude: str = "") -> str:
    """A script of ``dm/lua``, with a prelude of shared functions before it."""
    here = Path(__file__).parent / "lua"
    head = (here / prelude).read_text() if prelude else ""
    return head + (here / name).read_text()


#: the scripts, read once per process and registered once per client (see ``_script``)
_ALLOCATE = _lua("allocate.lua")
_RELEASE = _lua("release.lua")
_SNAPSHOT = _lua("snapshot.lua", prelude="node.lua")
_DECIDE = _lua("decide.lua", prelude="node.lua")
_UNLOCK = _lua("unlock.lua")
_INDEX = _lua("index.lua", prelude="node.lua")
_OBSERVE = _lua("observe.lua")


def observe(r: redis.Redis) -> dict[str, dict[str, str]]:
    """The live nodes (up, starting, stopping) as the failure detector needs them, in one call:
    node id -> {state, ts ('1' if it has published a sample), since, lease ('1' if held)}."""
    flat = _script(r, _OBSERVE)(keys=[k.NODES], args=[k.NODE, k.LEASE])
    out: dict[str, dict[str, str]] = {}
    for i in range(0, len(flat), 5):
        node_id, state, ts, since, lease = (str(x) for x in flat[i : i + 5])
        out[node_id] = {"state": state, "since": since, "lease": lease, **({"ts": ts} if ts == "1" else {})}
    return out


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


def unlock(r: redis.Redis, token: str, pipe: Any = None, key: str = k.PLACEMENT_LOCK) -> None:
    """Release a lock taken as ``token`` (the placement lock unless ``key``; on ``pipe`` if given)."""
    _script(r, _UNLOCK)(keys=[key], args=[token], client=pipe)


def _script(r: redis.Redis, source: str) -> Any:
    """A registered Lua script of this client (EVALSHA, loaded again after a Redis restart)."""
    scripts: dict[str, Any] = r.__dict__.setdefault("_dm_scripts", {})
    if source not in scripts:
        scripts[source] = r.register_script(source)
    return scripts[source]


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


def allocate(r: redis.Redis, node_id: str, dep_id: str, demand: Demand, pipe: Any = None) -> None:
    """Record a deployment's demand on a node (on ``pipe``, a pipeline of ``r``, if given)."""
    now = time.time()
    alloc = json.dumps({"cpu": demand.cpu, "memory": demand.memory, "ts": now})
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
