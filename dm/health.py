"""The control store's health as the failure detector saw it, for `dm status`, `dm watch`
and the metrics: Redis reachable, the last outage (when, how long, what), and the nodes in
grace (their lease lapsed while the control plane was blind: no verdict until the grace ends)."""

from __future__ import annotations

import time
from typing import Any

from dm import keys as k
from dm.control import Control


def control_store(ctl: Control, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    try:
        marks = ctl.ports.fleet.marks(k.DETECTOR)
    except Exception as exc:  # the point of this view: say so rather than fail
        return {"redis": "unreachable", "error": str(exc)}
    grace_until = float(marks.get("blind_until") or 0.0)
    in_grace: list[str] = []
    if grace_until > now:
        hashes = ctl.ports.fleet.node_hashes()
        live = [n for n, h in hashes.items() if h.get("state") in ("up", "starting", "stopping")]
        leases = ctl.ports.fleet.leases(live)
        in_grace = sorted(n for n in live if not leases.get(n))
    last = None
    if marks.get("outage_at"):
        last = {"at": float(marks["outage_at"]), "seconds": float(marks.get("outage_seconds") or 0.0),
                "what": marks.get("outage", "")}  # fmt: skip
    return {
        "redis": "reachable",
        "last_check": float(marks["seen"]) if marks.get("seen") else None,
        "last_outage": last,
        "grace_until": grace_until if grace_until > now else None,
        "nodes_in_grace": in_grace,
    }


def summary(health: dict[str, Any], now: float | None = None) -> str:
    """One line for `dm status`."""
    now = time.time() if now is None else now
    if health.get("redis") != "reachable":
        return f"Redis unreachable ({health.get('error', '')})"
    parts = ["Redis reachable"]
    last = health.get("last_outage")
    if last:
        parts.append(f"last outage {now - last['at']:.0f}s ago, {last['seconds']:.1f}s ({last['what']})")
    if health.get("grace_until"):
        parts.append(f"grace for {health['grace_until'] - now:.1f}s more, nodes in grace: "
                     f"{', '.join(health['nodes_in_grace']) or 'none'}")  # fmt: skip
    return "; ".join(parts)
