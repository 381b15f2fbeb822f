"""The fleet's hot state in Redis: node capacity and metrics, leases, allocations.

Placement reads everything it needs here in one pipeline; MongoDB keeps the
durable record. An allocation is the declared demand of a deployment placed on a
node; it counts as *reserved* on top of measured usage until the node's metrics
have had time to show it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from dm import constants as c
from dm.balancer import NodeView
from dm.models import Demand, MetricsSample

_clients: dict[str, redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    """One client (a connection pool) per URL and process."""
    client = _clients.get(url)
    if client is None:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=3, health_check_interval=10
        )
        _clients[url] = client
    return client


def register_node(
    r: redis.Redis, node_id: str, *, cpus: float, memory: float, state: str, host: str = "", address: str = ""
) -> None:
    pipe = r.pipeline()
    pipe.hset(
        c.NODE_KEY.format(node_id),
        mapping={"cpus": cpus, "memory": memory, "state": state, "host": host, "address": address},
    )
    pipe.sadd(c.NODES_KEY, node_id)
    pipe.execute()


def set_state(r: redis.Redis, node_id: str, state: str) -> None:
    r.hset(c.NODE_KEY.format(node_id), "state", state)


def remove_node(r: redis.Redis, node_id: str) -> None:
    pipe = r.pipeline()
    pipe.srem(c.NODES_KEY, node_id)
    pipe.delete(c.NODE_KEY.format(node_id), c.ALLOC_KEY.format(node_id), c.LEASE_KEY.format(node_id))
    pipe.execute()


def publish(r: redis.Redis, sample: MetricsSample, lease_ttl: float, token: str) -> str | None:
    """Publish a metrics sample and renew the node's lease (one round trip); returns the
    node's state as the control plane sees it (``dead`` tells it that it was replaced)."""
    pipe = r.pipeline()
    key = c.NODE_KEY.format(sample.node_id)
    pipe.hset(key, mapping={"cpu": sample.cpu, "ram": sample.ram, "ts": sample.ts})
    pipe.set(c.LEASE_KEY.format(sample.node_id), token, px=int(lease_ttl * 1000))
    pipe.hget(key, "state")
    state: str | None = pipe.execute()[2]
    return state


def presence_name(node_id: str) -> str:
    """The Redis client name of a node's presence connection."""
    return f"dm-node-{node_id}"


def present_nodes(r: redis.Redis) -> set[str] | None:
    """Node ids with a presence connection open, or None when CLIENT LIST is not allowed."""
    try:
        clients = r.client_list()
    except redis.RedisError:
        return None
    prefix = presence_name("")
    return {cl["name"][len(prefix) :] for cl in clients if cl.get("name", "").startswith(prefix)}


def leases(r: redis.Redis, node_ids: Iterable[str]) -> dict[str, bool]:
    ids = list(node_ids)
    pipe = r.pipeline()
    for node_id in ids:
        pipe.exists(c.LEASE_KEY.format(node_id))
    return {node_id: bool(alive) for node_id, alive in zip(ids, pipe.execute(), strict=True)}


def node_ids(r: redis.Redis) -> list[str]:
    return sorted(r.smembers(c.NODES_KEY))  # type: ignore[arg-type]


def node_hashes(r: redis.Redis) -> dict[str, dict[str, str]]:
    ids = node_ids(r)
    pipe = r.pipeline()
    for node_id in ids:
        pipe.hgetall(c.NODE_KEY.format(node_id))
    return dict(zip(ids, pipe.execute(), strict=True))


def snapshot(r: redis.Redis, settle: float, now: float | None = None) -> list[NodeView]:
    """Every registered node as the balancer sees it."""
    now = time.time() if now is None else now
    ids = node_ids(r)
    pipe = r.pipeline()
    for node_id in ids:
        pipe.hgetall(c.NODE_KEY.format(node_id))
        pipe.hgetall(c.ALLOC_KEY.format(node_id))
    replies = pipe.execute()
    views = []
    for i, node_id in enumerate(ids):
        node: dict[str, str] = replies[2 * i]
        allocs: dict[str, str] = replies[2 * i + 1]
        if not node or "cpus" not in node:
            continue
        views.append(_view(node_id, node, allocs, settle, now))
    return views


def _view(node_id: str, node: dict[str, str], allocs: dict[str, str], settle: float, now: float) -> NodeView:
    sample_ts = float(node.get("ts", 0.0))
    committed_cpu = committed_mem = reserved_cpu = reserved_mem = 0.0
    for raw in allocs.values():
        alloc: dict[str, Any] = json.loads(raw)
        committed_cpu += alloc["cpu"]
        committed_mem += alloc["memory"]
        # a sample taken before the deployment had time to ramp up does not show it yet
        if alloc["ts"] + settle > sample_ts:
            reserved_cpu += alloc["cpu"]
            reserved_mem += alloc["memory"]
    return NodeView(
        id=node_id,
        state=node.get("state", "starting"),
        cpus=float(node["cpus"]),
        memory=float(node["memory"]),
        cpu=float(node.get("cpu", 0.0)),
        ram=float(node.get("ram", 0.0)),
        committed_cpu=committed_cpu,
        committed_memory=committed_mem,
        reserved_cpu=reserved_cpu,
        reserved_memory=reserved_mem,
        deployments=len(allocs),
    )


def allocate(r: redis.Redis, node_id: str, dep_id: str, demand: Demand) -> None:
    alloc = {"cpu": demand.cpu, "memory": demand.memory, "ts": time.time()}
    r.hset(c.ALLOC_KEY.format(node_id), dep_id, json.dumps(alloc))


def release(r: redis.Redis, node_id: str, dep_id: str) -> None:
    r.hdel(c.ALLOC_KEY.format(node_id), dep_id)


def allocations(r: redis.Redis, node_id: str) -> dict[str, dict[str, Any]]:
    raw: dict[str, str] = r.hgetall(c.ALLOC_KEY.format(node_id))  # type: ignore[assignment]
    return {dep_id: json.loads(value) for dep_id, value in raw.items()}
