"""Every Redis key dm uses, in one place (Celery's own queues and results aside).

Redis holds the fleet's hot state; each entry says which facts are kept there and
whether they can be rebuilt from the registry (MongoDB is the truth for deployments
and nodes; Redis keeps the node's live figures and caches of the registry's facts).
``{}`` in a name is a node id.
"""

from __future__ import annotations

#: every dm key starts with this
PREFIX = "dm:"

# -- nodes ---------------------------------------------------------------------------
#: set: node ids placement considers (cache of the registry's live nodes)
NODES = "dm:nodes"
#: hash: a node's capacity, state (a cache of ``nodes.state``), host, address, its last
#: metrics sample (cpu, ram, ts) and the running totals of its allocations
NODE = "dm:node:{}"
#: string with a TTL: a node's liveness lease, renewed with each sample
LEASE = "dm:lease:{}"
#: list that is never filled: a node's presence connection blocks on it under the client
#: name ``dm-node-<id>``; the connection closing is the fast liveness signal
PRESENCE = "dm:presence:{}"
#: pub/sub channel a node listens on for kill orders (fencing)
NODE_CHANNEL = "dm:node:{}:control"
#: counter: the last node id handed out
NODE_SEQ = "dm:node_seq"

#: hash: deployment id -> JSON {cpu (cores), memory (MiB), memory_limit (MiB), ts}: what each
#: deployment on a node uses now, written by the node every metrics interval (expires)
USAGE = "dm:usage:{}"

# -- allocations (a cache of the registry's active deployments, rebuilt by the reconciler)
#: hash: deployment id -> JSON {cpu, memory, ts}: declared demand placed on a node
ALLOC = "dm:alloc:{}"
#: sorted set: deployment id -> time placed, of a node's recent allocations (reserved demand)
RECENT = "dm:recent:{}"

#: sorted set: node id -> score (load), of every node that takes work: the placement index,
#: kept current by every change of a node's sample, allocations or state (dm/lua/index.lua)
PLACEMENT_INDEX = "dm:placement:index"
#: string: the reservation settle time the index's scores were computed with (placement's)
PLACEMENT_SETTLE = "dm:placement:settle"

# -- the failure detector's memory --------------------------------------------------
#: hash: node id -> time it was first seen idle (scale-in)
IDLE_SINCE = "dm:idle_since"
#: hash: node id -> time its presence connection was first seen missing
ABSENT_SINCE = "dm:absent_since"
#: hash: node id -> run_id of the Redis server its presence connection was last seen in
PRESENT_IN = "dm:present_in"
#: hash: what the detector saw of Redis itself: ``run_id``, ``seen`` (time of the last pass),
#: ``blind_until`` (no verdicts on leases before this time: Redis was away or restarted)
DETECTOR = "dm:detector"
#: hash: node id -> time it was declared dead by its lease (a silent failure): deployments that
#: asked to keep running on a cut-off node (``keep_for``) move that long after it
DEAD_SINCE = "dm:dead_since"
#: set: the registered nodes in state ``dead`` (kept by every writer of a node's state), so a
#: pass finds them without reading the fleet
DEAD_NODES = "dm:nodes:dead"
#: hash: node id -> time the deployments of a dead node were all moved off (or found none):
#: later passes skip it until it rejoins
MOVED_OFF = "dm:moved_off"
#: hash: node id -> until when a mover (dm/reconcilers/detect.py) is placing its deployments
#: again: the placement reconciler leaves ``lost`` ones to it meanwhile
MOVING = "dm:moving"
#: string: time of the last completed failure-detector pass (the check-lag metric)
HEARTBEAT_LAST = "dm:heartbeat:last"

# -- locks and leases of control-plane roles ----------------------------------------
#: held around decide + reserve, so concurrent deployers never overcommit a node
PLACEMENT_LOCK = "dm:lock:placement"
#: held while the node manager starts or stops nodes
NODE_MANAGER_LOCK = "dm:lock:nodes"
#: the one bridge publishing deployment events to Kafka
EVENTS_LOCK = "dm:lock:bridge-events"
#: the one control worker whose relay copies events (dm.relay)
RELAY_LOCK = "dm:lock:relay"
#: held by the retention sweep (dm.retention), so two beats sweep once
RETENTION_LOCK = "dm:lock:retention"
#: held by one reconciler pass of a kind at a time (``{}`` is its name); short, never
#: held while a node starts
RECONCILE_LOCK = "dm:lock:reconcile:{}"

#: set: ids of hollow nodes to kill as ``kill -9`` would (workers/hollow.py, for scale benchmarks)
HOLLOW_KILL = "dm:hollow:kill"

# -- caches ---------------------------------------------------------------------------
#: token replaced by every algorithm added: caches of "the latest version" check it
ALGORITHMS_REV = "dm:algorithms:rev"


def node(node_id: str) -> str:
    return NODE.format(node_id)


def lease(node_id: str) -> str:
    return LEASE.format(node_id)


def alloc(node_id: str) -> str:
    return ALLOC.format(node_id)


def recent(node_id: str) -> str:
    return RECENT.format(node_id)


def presence(node_id: str) -> str:
    return PRESENCE.format(node_id)
