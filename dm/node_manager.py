"""The node manager: starts and stops nodes through a provider, lists the active ones.

A provider is anything with ``start(node_id, cpus, memory) -> pid`` and
``stop(node)``. ``local`` starts node agents as processes on this machine, each in
its own session so a restart of the control worker does not take them down.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Protocol

from dm import fleet
from dm.balancer import NodeView
from dm.errors import ConfigError
from dm.registry import Doc

if TYPE_CHECKING:
    from dm.control import Control

log = logging.getLogger(__name__)

#: node states
STARTING = "starting"
UP = "up"
STOPPING = "stopping"
DEAD = "dead"
STOPPED = "stopped"
LIVE_STATES = (STARTING, UP)

NODE_SEQ_KEY = "dm:node_seq"


class Provider(Protocol):
    name: str

    def start(self, ctl: Control, node_id: str, cpus: float, memory: float) -> int | None: ...

    def stop(self, node: Doc) -> None: ...


class LocalProvider:
    """Node agents as child processes of this machine, logs under ``DM_HOME/nodes``."""

    name = "local"

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, ctl: Control, node_id: str, cpus: float, memory: float) -> int:
        s = ctl.settings
        logs = s.home / "nodes"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **s.to_env()}
        cmd = [sys.executable, "-m", "workers", "--id", node_id, "--cpus", str(cpus), "--memory", str(memory)]
        with open(logs / f"node-{node_id}.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.children[node_id] = proc
        return proc.pid

    def stop(self, node: Doc) -> None:
        pid = node.get("pid")
        if pid and node.get("host") == socket.gethostname():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reap()

    def exited(self) -> list[str]:
        """Node ids whose agent process has exited (a faster signal than the lease)."""
        gone = [node_id for node_id, proc in self.children.items() if proc.poll() is not None]
        for node_id in gone:
            del self.children[node_id]
        return gone

    def reap(self) -> None:
        self.exited()


_providers: dict[str, Any] = {}


def provider(name: str) -> Any:
    if name not in ("local",):
        raise ConfigError(f"unknown node provider {name!r}; known: local")
    if name not in _providers:
        _providers[name] = LocalProvider()
    return _providers[name]


def add_node(ctl: Control, nodes: list[NodeView] | None = None) -> str | None:
    """Start one node and register it as ``starting``; None when ``max_nodes`` are live.

    Called with the placement lock held, so two deployers cannot both add the last node.
    """
    s = ctl.settings
    if nodes is None:
        nodes = fleet.snapshot(ctl.redis, s.reservation_settle)
    live = [n for n in nodes if n.state in LIVE_STATES]
    if len(live) >= s.max_nodes:
        return None
    node_id = str(ctl.redis.incr(NODE_SEQ_KEY))
    host = socket.gethostname()
    prov = provider(s.provider)
    # registered before it runs, so placements can go to its queue while it starts
    fleet.register_node(ctl.redis, node_id, cpus=s.node_cpus, memory=s.node_memory, state=STARTING, host=host)
    ctl.registry.upsert_node(
        node_id, state=STARTING, host=host, cpus=s.node_cpus, memory=s.node_memory, provider=prov.name, pid=None
    )
    pid = prov.start(ctl, node_id, s.node_cpus, s.node_memory)
    ctl.registry.upsert_node(node_id, pid=pid)
    log.info("started node-%s (pid %s, %g cpu, %g MiB)", node_id, pid, s.node_cpus, s.node_memory)
    return node_id


def stop_node(ctl: Control, node_id: str) -> None:
    """Ask a node to stop; it hands its deployments over as it goes."""
    node = ctl.registry.get_node(node_id)
    if node is None:
        return
    ctl.registry.set_node_state(node_id, STOPPING, expect=LIVE_STATES)
    fleet.set_state(ctl.redis, node_id, STOPPING)
    provider(node.get("provider") or ctl.settings.provider).stop(node)


def active_nodes(ctl: Control) -> list[Doc]:
    return ctl.registry.list_nodes(LIVE_STATES)
