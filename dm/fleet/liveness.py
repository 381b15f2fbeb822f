"""Nodes in Redis and whether they live: registration, state (a copy of the registry's),
metrics samples with the lease, the presence connections, and what the failure detector reads."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import redis

from dm import keys as k
from dm import redis_conn
from dm.fleet.allocations import reindex
from dm.fleet.scripts import _COUNTS, _OBSERVE, _script
from dm.models import MetricsSample

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
    _dead_set(pipe, node_id, str(state))
    reindex(r, [node_id], pipe)
    pipe.execute()


def _dead_set(pipe: Any, node_id: str, state: str) -> None:
    """Keep ``dm:nodes:dead`` with the node's state, on ``pipe`` (every writer of a state calls it)."""
    if state == "dead":
        pipe.sadd(k.DEAD_NODES, node_id)
    else:
        pipe.srem(k.DEAD_NODES, node_id)
        pipe.hdel(k.MOVED_OFF, node_id)


def live_counts(r: redis.Redis) -> list[tuple[str, str, int]]:
    """(node id, state, deployments) of every live node (up, starting, stopping), in one call."""
    flat = [str(x) for x in _script(r, _COUNTS)(keys=[k.NODES], args=[k.NODE])]
    return [(flat[i], flat[i + 1], int(flat[i + 2] or 0)) for i in range(0, len(flat), 3)]


def dead_nodes(r: redis.Redis) -> list[str]:
    """The registered nodes in state ``dead``."""
    return sorted(str(n) for n in r.smembers(k.DEAD_NODES))  # type: ignore[union-attr]


def set_state(r: redis.Redis, node_id: str, state: str) -> None:
    pipe = r.pipeline()
    pipe.hset(k.NODE.format(node_id), "state", str(state))
    _dead_set(pipe, node_id, str(state))
    reindex(r, [node_id], pipe)
    pipe.execute()


def remove_node(r: redis.Redis, node_id: str) -> None:
    member = r.hget(k.NODE.format(node_id), "imember")  # its entry in the placement index (see node.lua)
    pipe = r.pipeline()
    pipe.srem(k.NODES, node_id)
    pipe.srem(k.DEAD_NODES, node_id)
    pipe.hdel(k.MOVED_OFF, node_id)
    pipe.zrem(k.PLACEMENT_INDEX, node_id, *([member] if member else []))
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


def nodes_seen(r: redis.Redis) -> tuple[dict[str, dict[str, str]], dict[str, bool]]:
    """Every node's hash, and whether its lease is held: one round trip after the members
    (what `dm status` shows), not one per kind."""
    ids = node_ids(r)
    pipe = r.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(k.NODE.format(node_id))
        pipe.exists(k.LEASE.format(node_id))
    replies = pipe.execute()
    hashes = dict(zip(ids, replies[0::2], strict=True))
    return hashes, {node_id: bool(held) for node_id, held in zip(ids, replies[1::2], strict=True)}


def observe(r: redis.Redis) -> dict[str, dict[str, str]]:
    """The live nodes (up, starting, stopping) as the failure detector needs them, in one call:
    node id -> {state, ts ('1' if it has published a sample), since, lease ('1' if held)}."""
    flat = _script(r, _OBSERVE)(keys=[k.NODES], args=[k.NODE, k.LEASE])
    out: dict[str, dict[str, str]] = {}
    for i in range(0, len(flat), 5):
        node_id, state, ts, since, lease = (str(x) for x in flat[i : i + 5])
        out[node_id] = {"state": state, "since": since, "lease": lease, **({"ts": ts} if ts == "1" else {})}
    return out
