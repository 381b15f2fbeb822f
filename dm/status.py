"""What `dm status`, `dm nodes`, `dm watch` and the metrics show of the nodes: one source,
with the lease rule applied (a node whose lease expired is dead, whatever the registry says yet)."""

from __future__ import annotations

import json
from typing import Any

from dm import balancer, fleet
from dm import keys as k
from dm.control import Control


def node_rows(ctl: Control) -> list[dict[str, Any]]:
    s = ctl.settings
    hashes = fleet.node_hashes(ctl.redis)
    views = {v.id: v for v in fleet.snapshot(ctl.redis, s.reservation_settle)}
    leases = fleet.leases(ctl.redis, hashes)
    rows = []
    for doc in ctl.registry.list_nodes():
        node_id = doc["_id"]
        h = hashes.get(node_id, {})
        view = views.get(node_id)
        cpu, ram = float(h.get("cpu", 0.0)), float(h.get("ram", 0.0))
        state = h.get("state") or doc.get("state")
        if state in ("up", "starting") and not leases.get(node_id) and "ts" in h:
            state = "dead"  # the lease says so before the next heartbeat check does
        rows.append(
            {
                "id": node_id,
                "name": f"node-{node_id}",
                "host": doc.get("host"),
                "address": doc.get("address"),
                "state": state,
                "cpus": doc.get("cpus"),
                "memory": doc.get("memory"),
                "cpu": round(cpu, 1),
                "ram": round(ram, 1),
                "load": round(balancer.load(cpu, ram), 1),
                "deployments": view.deployments if view else 0,
                "committed_cpu": round(view.committed_cpu, 2) if view else 0.0,
                "pid": doc.get("pid"),
                # orders it refused for a missing or wrong signature (workers/tasks.py)
                "refused_orders": int(h.get("refused_orders") or 0),
                # how the node holds its algorithms (written by the node at start: workers/supervisor.py)
                "containment": h.get("containment") or doc.get("containment") or "unknown",
                "run_as": h.get("run_as") or doc.get("run_as") or "unknown",
            }
        )
    return rows


def deployment_usage(ctl: Control, node_ids: list[str]) -> dict[str, dict[str, float]]:
    """What each deployment on these nodes uses now: id -> {cpu (cores), memory (MiB),
    memory_limit (MiB), ts}, as its node last published it (absent: not measured lately)."""
    pipe = ctl.redis.pipeline(transaction=False)
    for node_id in node_ids:
        pipe.hgetall(k.USAGE.format(node_id))
    out: dict[str, dict[str, float]] = {}
    for fields in pipe.execute():
        for dep_id, raw in fields.items():
            try:
                out[dep_id] = json.loads(raw)
            except ValueError:
                continue
    return out
