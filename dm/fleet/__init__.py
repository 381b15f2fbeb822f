"""The fleet's hot state in Redis: node capacity and metrics, leases, allocations.

Placement reads everything it needs here in one script call; MongoDB keeps the
durable record. An allocation is the declared demand of a deployment placed on a
node; it counts as *reserved* on top of measured usage until the node's metrics
have had time to show it. Each node's hash keeps running totals of its allocations
(``alloc_cpu``, ``alloc_memory``, ``alloc_n``), and a sorted set its recent ones, so a
snapshot costs the same with 10 deployments as with 10,000.
"""

from __future__ import annotations

from dm.fleet.allocations import (
    DECIDE_POLICIES,
    INDEX_SETTLE,
    allocate,
    allocations,
    clear_allocations,
    decide,
    decide_many,
    extend_lock,
    reindex,
    release,
    snapshot,
    unlock,
)
from dm.fleet.liveness import (
    dead_nodes,
    leases,
    live_counts,
    node_hashes,
    node_ids,
    nodes_seen,
    observe,
    presence_name,
    present_nodes,
    publish,
    publish_many,
    redis_client,
    register_node,
    remove_node,
    set_state,
)

__all__ = [
    "DECIDE_POLICIES",
    "INDEX_SETTLE",
    "allocate",
    "allocations",
    "clear_allocations",
    "dead_nodes",
    "decide",
    "decide_many",
    "extend_lock",
    "leases",
    "live_counts",
    "node_hashes",
    "node_ids",
    "nodes_seen",
    "observe",
    "presence_name",
    "present_nodes",
    "publish",
    "publish_many",
    "redis_client",
    "register_node",
    "reindex",
    "release",
    "remove_node",
    "set_state",
    "snapshot",
    "unlock",
]  # fmt: skip
