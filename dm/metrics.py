"""Prometheus metrics of dm itself: ``dm metrics --port P`` (``dm up`` starts it).

Gauges are read at each scrape from the same sources as ``dm status`` (node rows
with the lease rule, deployments by state), so the two always agree. Counters and
histograms come from the registry's ``events``, tailed by time (``_id`` dedupes): a new exporter
replays the whole history, so its counters are lifetime totals and a restart of
the exporter does not reset them.

==========================================  =======  ===================================
metric                                      type     labels
==========================================  =======  ===================================
``dm_node_state``                           gauge    node, host, state (1 = current)
``dm_node_cpu_percent`` / ``_ram_percent``  gauge    node, host
``dm_node_load``                            gauge    node, host (``1/(1/cpu + 1/ram)``)
``dm_node_deployments``                     gauge    node, host
``dm_nodes`` / ``dm_deployments``           gauge    state
``dm_placements_total``                     counter  (``scheduled`` events)
``dm_restarts_total``                       counter  (``restarting`` events)
``dm_failovers_total``                      counter  (``lost`` events)
``dm_placement_latency_seconds``            hist.    pending -> scheduled
``dm_failover_seconds``                     hist.    lost -> running in a later generation
``dm_heartbeat_check_lag_seconds``          gauge    now - the last completed check
``dm_metrics_up``                           gauge    0 when Redis or MongoDB was unreachable
==========================================  =======  ===================================
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from dm import health, keys
from dm.control import Control
from dm.errors import DMError
from dm.models import FINAL_STATES, LOST, PENDING, RESTARTING, RUNNING, SCHEDULED, STATES
from dm.registry import EventCursor, Registry
from dm.settings import Settings
from dm.status import deployment_counts, deployment_usage, node_rows  # what `dm status` shows, with the lease rule

log = logging.getLogger(__name__)

#: Redis key: time (epoch seconds) of the last completed failure-detector pass
HEARTBEAT_LAST_KEY = keys.HEARTBEAT_LAST
#: default port of ``dm metrics`` (Flower keeps its own /metrics on its port)
DEFAULT_PORT = 9464
#: node states always present in ``dm_node_state`` (stopped nodes are left out, as in ``dm status``)
NODE_STATES = ("starting", "up", "stopping", "dead")

PLACEMENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
FAILOVER_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class EventTail:
    """Reads ``events`` incrementally in the relay's order; counts and times the transitions."""

    def __init__(self, registry: Registry) -> None:
        self.placements = Counter("dm_placements", "Deployments placed on a node (scheduled events)", registry=None)
        self.restarts = Counter("dm_restarts", "Algorithms restarted on their node (restarting events)", registry=None)
        self.failovers = Counter("dm_failovers", "Deployments lost with their node (lost events)", registry=None)
        self.placement_latency = Histogram(
            "dm_placement_latency_seconds", "From pending to scheduled", buckets=PLACEMENT_BUCKETS, registry=None
        )
        self.failover_time = Histogram(
            "dm_failover_seconds", "From lost to running again in a later generation",
            buckets=FAILOVER_BUCKETS, registry=None,
        )  # fmt: skip
        self._cursor = EventCursor(registry)
        self._pending: dict[str, float] = {}  # deployment -> when it started waiting for a node
        self._lost: dict[str, tuple[int, float]] = {}  # deployment -> (generation lost, when)

    def poll(self) -> int:
        """Read the events added since the last poll, in order; returns how many were new."""
        new = self._cursor.poll()
        for event in new:
            self.observe(event)
        return len(new)

    def observe(self, event: dict[str, Any]) -> None:
        dep, state, when, generation = event["deployment_id"], event["state"], event["time"], event["generation"]
        if state == PENDING:
            self._pending.setdefault(dep, when)
        elif state == SCHEDULED:
            self.placements.inc()
            started = self._pending.pop(dep, None)
            if started is not None:
                self.placement_latency.observe(max(0.0, when - started))
        elif state == RESTARTING:
            self.restarts.inc()
        elif state == LOST:
            self.failovers.inc()
            self._lost.setdefault(dep, (generation, when))
        elif state == RUNNING and dep in self._lost and generation > self._lost[dep][0]:
            self.failover_time.observe(max(0.0, when - self._lost.pop(dep)[1]))
        if state in FINAL_STATES:
            self._pending.pop(dep, None)
            self._lost.pop(dep, None)

    def collect(self) -> Iterator[Metric]:
        for metric in (self.placements, self.restarts, self.failovers, self.placement_latency, self.failover_time):
            yield from metric.collect()


class DMCollector:
    """Everything dm exports, read at scrape time (scrapes are serialized)."""

    def __init__(self, ctl: Control) -> None:
        self.ctl = ctl
        self.tail = EventTail(ctl.registry)
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families: list[Metric] = []
            up = 1.0
            try:
                self.tail.poll()
                families = self._fleet(time.time())
            except (PyMongoError, RedisError, DMError) as exc:
                log.warning("cannot read the fleet for metrics: %s", exc)
                up = 0.0
            yield GaugeMetricFamily("dm_metrics_up", "1 when this scrape could read Redis and MongoDB", value=up)
            yield from families
            yield from self.tail.collect()

    def _fleet(self, now: float) -> list[Metric]:
        rows = [r for r in node_rows(self.ctl) if r["state"] != "stopped"]
        labels = ["node", "host"]
        state = GaugeMetricFamily("dm_node_state", "1 for the node's current state", labels=[*labels, "state"])
        gauges = {
            "cpu": GaugeMetricFamily("dm_node_cpu_percent", "CPU used, percent of capacity", labels=labels),
            "ram": GaugeMetricFamily("dm_node_ram_percent", "Memory used, percent of capacity", labels=labels),
            "load": GaugeMetricFamily("dm_node_load", "Placement load 1/(1/cpu + 1/ram)", labels=labels),
            "deployments": GaugeMetricFamily("dm_node_deployments", "Deployments placed on the node", labels=labels),
        }
        refused = CounterMetricFamily("dm_node_refused_orders", "Orders a node refused for a missing or wrong "
                                      "signature", labels=labels)  # fmt: skip
        nodes = GaugeMetricFamily("dm_nodes", "Nodes by state (stopped ones left out)", labels=["state"])
        by_state = dict.fromkeys(NODE_STATES, 0)
        for row in rows:
            node, host, current = str(row["id"]), str(row.get("host") or ""), str(row["state"])
            by_state[current] = by_state.get(current, 0) + 1
            for name in sorted({*NODE_STATES, current}):
                state.add_metric([node, host, name], 1.0 if name == current else 0.0)
            for key, family in gauges.items():
                family.add_metric([node, host], float(row[key]))
            refused.add_metric([node, host], float(row.get("refused_orders") or 0))
        for name, count in by_state.items():
            nodes.add_metric([name], count)
        deployments = GaugeMetricFamily("dm_deployments", "Deployments by state", labels=["state"])
        counts = deployment_counts(self.ctl)  # one indexed count per state, not a group over all
        for name in sorted({*STATES, *counts}):
            deployments.add_metric([name], counts.get(name, 0))
        used_cpu = GaugeMetricFamily("dm_deployment_cpu_cores", "Cores a deployment uses now (its cgroup)",
                                     labels=["deployment"])  # fmt: skip
        used_mem = GaugeMetricFamily("dm_deployment_memory_mib", "MiB a deployment uses now (its cgroup)",
                                     labels=["deployment"])  # fmt: skip
        for dep_id, used in deployment_usage(self.ctl, [str(row["id"]) for row in rows]).items():  # one round trip
            used_cpu.add_metric([dep_id], float(used.get("cpu") or 0.0))
            used_mem.add_metric([dep_id], float(used.get("memory") or 0.0))
        families: list[Metric] = [state, *gauges.values(), refused, nodes, deployments, used_cpu, used_mem]
        last = self.ctl.redis.get(HEARTBEAT_LAST_KEY)
        if last is not None:
            help_ = "Seconds since the last completed heartbeat check"
            families.append(GaugeMetricFamily("dm_heartbeat_check_lag_seconds", help_, value=now - float(str(last))))
        store = health.control_store(self.ctl, now)
        outage = store.get("last_outage")
        if outage:
            families.append(GaugeMetricFamily("dm_control_store_last_outage_seconds",
                                              "How long the last Redis outage or stall the detector saw lasted",
                                              value=outage["seconds"]))  # fmt: skip
        families.append(GaugeMetricFamily("dm_nodes_in_grace", "Nodes whose lease lapsed while the control "
                                          "plane was blind: no verdict on them until the grace ends",
                                          value=len(store.get("nodes_in_grace") or [])))  # fmt: skip
        return families


def make_registry(ctl: Control) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DMCollector(ctl))
    return registry


def serve(settings: Settings, port: int, address: str = "127.0.0.1", say: Callable[[str], None] = print) -> int:
    """Serve ``/metrics`` until SIGTERM or Ctrl-C."""
    ctl = Control(settings)
    ctl.registry.ping()
    server, _thread = start_http_server(port, addr=address, registry=make_registry(ctl))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    say(f"dm metrics at http://{address}:{port}/metrics")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
    return 0
