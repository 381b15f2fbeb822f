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
    pipe.delete(c.NODE_KEY.format(node_id), c.ALLOC_KEY.format(node_id), c.LEASE_KEY.format(node_id),
                c.RECENT_KEY.format(node_id))  # fmt: skip
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


#: allocate: KEYS alloc hash, node hash, recent set; ARGV dep id, cpu, memory, time, JSON.
#: The node hash keeps running totals: alloc_* of every allocation, res_* of the recent ones.
_ALLOCATE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local a = cjson.decode(old)
  redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_cpu', tostring(-a.cpu))
  redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_memory', tostring(-a.memory))
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
    redis.call('HINCRBYFLOAT', KEYS[2], 'res_cpu', tostring(-a.cpu))
    redis.call('HINCRBYFLOAT', KEYS[2], 'res_memory', tostring(-a.memory))
  end
else
  redis.call('HINCRBY', KEYS[2], 'alloc_n', 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_cpu', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_memory', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[2], 'res_cpu', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], 'res_memory', ARGV[3])
"""
#: release: KEYS alloc hash, node hash, recent set; ARGV dep id
_RELEASE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local recent = redis.call('ZREM', KEYS[3], ARGV[1])
if not old then return 0 end
local a = cjson.decode(old)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_cpu', tostring(-a.cpu))
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_memory', tostring(-a.memory))
redis.call('HINCRBY', KEYS[2], 'alloc_n', -1)
if recent == 1 then
  redis.call('HINCRBYFLOAT', KEYS[2], 'res_cpu', tostring(-a.cpu))
  redis.call('HINCRBYFLOAT', KEYS[2], 'res_memory', tostring(-a.memory))
end
return 1
"""
#: snapshot: KEYS the node set; ARGV settle seconds, node key pattern, alloc pattern, recent pattern.
#: Per node: id, then cpus, memory, state, cpu, ram, alloc_cpu, alloc_memory, alloc_n, and the
#: reserved cpu and memory (as strings: Lua numbers come back as integers). Reserved is what
#: was placed after the node's last sample minus settle: allocations older than that leave
#: the recent set and its totals here (with settle 0, a look that changes nothing), so the
#: cost does not grow with the number of deployments, only with those placed since.
_NODE_LUA = """
-- a node's hash fields placement reads: cpus, memory, state, cpu, ram, alloc_cpu,
-- alloc_memory, alloc_n, ts, res_cpu, res_memory
local function read_node(pattern, id)
  local key = string.gsub(pattern, '{}', id)
  return key, redis.call('HMGET', key, 'cpus', 'memory', 'state', 'cpu', 'ram',
                         'alloc_cpu', 'alloc_memory', 'alloc_n', 'ts', 'res_cpu', 'res_memory')
end
-- the node's reserved cpu and memory: what was placed after its last sample minus settle.
-- Allocations older than that leave the recent set and its totals (with settle 0, a look
-- that changes nothing), so the cost grows only with what was placed since.
local function reserved(key, row, id, settle, alloc_pattern, recent_pattern)
  local ts = tonumber(row[9] or '0') or 0
  local cpu, memory = tonumber(row[10] or '0') or 0, tonumber(row[11] or '0') or 0
  local rkey = string.gsub(recent_pattern, '{}', id)
  local settled = redis.call('ZRANGEBYSCORE', rkey, '-inf', tostring(ts - settle))
  if #settled > 0 then
    for _, v in ipairs(redis.call('HMGET', string.gsub(alloc_pattern, '{}', id), unpack(settled))) do
      if v then
        local a = cjson.decode(v)
        cpu = cpu - a.cpu
        memory = memory - a.memory
      end
    end
    if settle > 0 then
      redis.call('ZREM', rkey, unpack(settled))
      redis.call('HSET', key, 'res_cpu', tostring(cpu), 'res_memory', tostring(memory))
    end
  end
  return cpu, memory
end
"""
#: snapshot: KEYS the node set; ARGV settle seconds, node key pattern, alloc pattern, recent pattern.
#: Per node: id, then cpus, memory, state, cpu, ram, alloc_cpu, alloc_memory, alloc_n, and the
#: reserved cpu and memory (as strings: Lua numbers come back as integers).
_SNAPSHOT = (
    _NODE_LUA
    + """
local settle = tonumber(ARGV[1])
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key, row = read_node(ARGV[2], id)
  local cpu, memory = reserved(key, row, id, settle, ARGV[3], ARGV[4])
  row[9] = tostring(cpu)
  row[10] = tostring(memory)
  row[11] = nil
  table.insert(row, 1, id)
  out[#out + 1] = row
end
return out
"""
)


#: decide: take the placement lock and choose a node, in one call (policies ``min`` and ``max``).
#: KEYS the node set, the lock; ARGV token, lock ms, settle, demand cpu, demand memory,
#: threshold, policy, node key pattern, alloc pattern, recent pattern.
#: Returns {'locked'}, or with the lock taken {'ok', id, score} or {'none'}. The same
#: arithmetic as dm.balancer (its tests hold the two side by side) on the same figures
#: as :func:`snapshot` (with the same trimming of settled reservations).
_DECIDE = (
    _NODE_LUA
    + """
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
local settle = tonumber(ARGV[3])
local dcpu, dmem, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]) + 1e-9
local want_max = ARGV[7] == 'max'
local function round6(x) return math.floor(x * 1e6 + 0.5) / 1e6 end
local function pct(amount, capacity) return amount / capacity * 100.0 end
local best, bscore, bn
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key, row = read_node(ARGV[8], id)
  local cpus, memory = tonumber(row[1] or ''), tonumber(row[2] or '')
  local state = row[3] or 'starting'
  if cpus and memory and cpus > 0 and memory > 0 and (state == 'up' or state == 'starting') then
    local rcpu, rmem = reserved(key, row, id, settle, ARGV[9], ARGV[10])
    rcpu, rmem = math.max(0, round6(rcpu)), math.max(0, round6(rmem))
    local ccpu = math.max(0, round6(tonumber(row[6] or '0') or 0))
    local cmem = math.max(0, round6(tonumber(row[7] or '0') or 0))
    local ecpu = math.max((tonumber(row[4] or '0') or 0) + pct(rcpu, cpus), pct(ccpu, cpus))
    local eram = math.max((tonumber(row[5] or '0') or 0) + pct(rmem, memory), pct(cmem, memory))
    if ecpu + pct(dcpu, cpus) <= limit and eram + pct(dmem, memory) <= limit then
      local score = 0
      if ecpu > 0 and eram > 0 then score = 1.0 / (1.0 / ecpu + 1.0 / eram) end
      local n = tonumber(row[8] or '0') or 0
      local key1 = want_max and -score or score
      local bkey = best and (want_max and -bscore or bscore)
      if not best or key1 < bkey or (key1 == bkey and (n < bn or (n == bn and id < best))) then
        best, bscore, bn = id, score, n
      end
    end
  end
end
if best then return {'ok', best, tostring(bscore)} end
return {'none'}
"""
)
#: release the lock if it is still this token's: KEYS the lock; ARGV token
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: policies the one-call decision knows (``p2c`` reads the fleet and asks dm.balancer)
DECIDE_POLICIES = ("min", "max")


def decide(
    r: redis.Redis, token: str, demand: Demand, threshold: float, policy: str, settle: float, lock_seconds: float
) -> list[str]:
    """Take the placement lock (as ``token``) and choose a node in one call; see ``_DECIDE``."""
    keys = [c.NODES_KEY, c.PLACEMENT_LOCK]
    args = [token, int(lock_seconds * 1000), settle, repr(demand.cpu), repr(demand.memory), threshold, policy,
            c.NODE_KEY, c.ALLOC_KEY, c.RECENT_KEY]  # fmt: skip
    return [str(x) for x in _script(r, _DECIDE)(keys=keys, args=args)]


def unlock(r: redis.Redis, token: str, pipe: Any = None) -> None:
    """Release the placement lock taken as ``token`` (on ``pipe`` if given)."""
    _script(r, _UNLOCK)(keys=[c.PLACEMENT_LOCK], args=[token], client=pipe)


def _script(r: redis.Redis, source: str) -> Any:
    """A registered Lua script of this client (EVALSHA, loaded again after a Redis restart)."""
    scripts: dict[str, Any] = r.__dict__.setdefault("_dm_scripts", {})
    if source not in scripts:
        scripts[source] = r.register_script(source)
    return scripts[source]


def snapshot(r: redis.Redis, settle: float, now: float | None = None) -> list[NodeView]:
    """Every registered node as the balancer sees it (one script call)."""
    del now  # the reserved figure depends on each node's sample time, not on the clock
    rows = _script(r, _SNAPSHOT)(keys=[c.NODES_KEY], args=[settle, c.NODE_KEY, c.ALLOC_KEY, c.RECENT_KEY])
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
    keys = [c.ALLOC_KEY.format(node_id), c.NODE_KEY.format(node_id), c.RECENT_KEY.format(node_id)]
    _script(r, _ALLOCATE)(
        keys=keys, args=[dep_id, repr(demand.cpu), repr(demand.memory), repr(now), alloc], client=pipe
    )


def release(r: redis.Redis, node_id: str, dep_id: str) -> None:
    keys = [c.ALLOC_KEY.format(node_id), c.NODE_KEY.format(node_id), c.RECENT_KEY.format(node_id)]
    _script(r, _RELEASE)(keys=keys, args=[dep_id])


def clear_allocations(r: redis.Redis, node_id: str) -> None:
    """Forget every allocation of a node (it died; its deployments are placed elsewhere)."""
    pipe = r.pipeline()
    pipe.delete(c.ALLOC_KEY.format(node_id), c.RECENT_KEY.format(node_id))
    pipe.hdel(c.NODE_KEY.format(node_id), "alloc_cpu", "alloc_memory", "alloc_n", "res_cpu", "res_memory")
    pipe.execute()


def allocations(r: redis.Redis, node_id: str) -> dict[str, dict[str, Any]]:
    raw: dict[str, str] = r.hgetall(c.ALLOC_KEY.format(node_id))  # type: ignore[assignment]
    return {dep_id: json.loads(value) for dep_id, value in raw.items()}
