"""The control store's health in every dm worker's ``celery inspect stats``, so that Flower
shows it on each worker's page (tab *Other*): the control worker and every node say whether
Redis is reachable, its last outage and how long it lasted, and the nodes in grace; a node
adds its own lease (renewed how long ago, when it would fence) and the outages it saw.

Flower asks a worker for its stats through the broker, which is Redis: while Redis is away
no worker can answer, and the page shows what the workers said before and after.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps

log = logging.getLogger("dm.worker_stats")

View = Callable[[], dict[str, str]]
#: what this process adds to its stats; ``None`` for the control plane's view alone
_node_view: View | None = None


def set_node_view(view: View | None) -> None:
    """A node agent's own lines (its lease, the outages it saw), shown under the control plane's."""
    global _node_view
    _node_view = view


def control_plane_lines(now: float | None = None) -> dict[str, str]:
    """The control store's health as the failure detector saw it, as Flower's rows."""
    from dm import health
    from dm.control import get_control

    now = time.time() if now is None else now
    seen = health.control_store(get_control(), now)
    lines = {"dm control store": health.summary(seen, now)}
    if seen.get("redis") == "reachable":
        last = seen.get("last_outage")
        lines["dm last outage"] = (
            f"{_utc(last['at'])}, {last['seconds']:.1f}s: {last['what']}" if last else "none seen in this Redis"
        )
        grace = seen.get("grace_until")
        lines["dm nodes in grace"] = (
            f"{', '.join(seen['nodes_in_grace']) or 'none'} (no lease verdicts for {grace - now:.1f}s more)"
            if grace
            else "none"
        )
    return lines


def lines() -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (control_plane_lines, _node_view):
        if part is None:
            continue
        try:
            out.update(part())
        except Exception as exc:  # the stats reply must come back whatever a store does
            out[f"dm {getattr(part, '__name__', 'view')} error"] = f"{type(exc).__name__}: {exc}"
    return out


class ControlStoreStats(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep whose ``info`` adds :func:`lines` to the worker's stats."""

    label = "dm control store"

    def info(self, worker: Any) -> dict[str, str]:
        return lines()


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
