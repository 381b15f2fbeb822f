"""The node manager: starts and stops nodes through a provider, lists the active ones.

The provider (``DM_PROVIDER``: ``local``, ``command`` or ``static``, see
:mod:`dm.providers`) decides where a node runs and how it is started; with
``static`` the node manager starts nothing and uses the nodes that registered
themselves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dm import fleet, providers
from dm import keys as k
from dm.balancer import NodeView
from dm.lifecycle import LIVE_NODE, NodeState, set_node_state
from dm.providers import Provider

if TYPE_CHECKING:
    from dm.control import Control

log = logging.getLogger(__name__)

#: node states (the enum of dm.lifecycle)
STARTING = NodeState.STARTING
UP = NodeState.UP
STOPPING = NodeState.STOPPING
DEAD = NodeState.DEAD
STOPPED = NodeState.STOPPED
LIVE_STATES = LIVE_NODE

NODE_SEQ_KEY = k.NODE_SEQ


def provider(name: str) -> Provider:
    """The process-wide instance of the named provider."""
    return providers.get(name)


def add_node(ctl: Control, nodes: list[NodeView] | None = None) -> str | None:
    """Start one node and register it as ``starting``; None when ``max_nodes`` are live,
    or when the provider starts no nodes (``static``).

    Called under the node manager's lock (:func:`dm.deployer.grow`), so two deployers
    cannot both add the last node; never under the placement lock.
    """
    s = ctl.settings
    prov = provider(s.provider)
    if not prov.starts_nodes:
        return None
    if nodes is None:
        nodes = fleet.snapshot(ctl.redis, s.reservation_settle)
    live = [n for n in nodes if n.state in LIVE_STATES]
    if len(live) >= s.max_nodes:
        return None
    node_id = next_node_id(ctl)
    host = prov.choose_host(ctl)
    # registered before it runs, so placements can go to its queue while it starts
    fleet.register_node(ctl.redis, node_id, cpus=s.node_cpus, memory=s.node_memory, state=STARTING, host=host)
    ctl.registry.upsert_node(
        node_id, state=STARTING, host=host, provider_host=host, cpus=s.node_cpus, memory=s.node_memory,
        provider=prov.name, pid=None,
    )  # fmt: skip
    pid = prov.start(ctl, node_id, s.node_cpus, s.node_memory, host)
    ctl.registry.upsert_node(node_id, pid=pid)
    log.info("started node-%s on %s (pid %s, %g cpu, %g MiB)", node_id, host or "-", pid, s.node_cpus, s.node_memory)
    return node_id


def next_node_id(ctl: Control) -> str:
    """A node id never handed out before. The counter is in Redis; a Redis that lost its
    data starts it again from 0, so it is moved past the highest id the registry knows."""
    node_id = int(ctl.redis.incr(NODE_SEQ_KEY))
    known = [int(d["_id"]) for d in ctl.registry.list_nodes() if str(d["_id"]).isdigit()]
    if known and node_id <= max(known):
        ctl.redis.set(NODE_SEQ_KEY, max(known), nx=False)
        node_id = int(ctl.redis.incr(NODE_SEQ_KEY))
    return str(node_id)


def stop_node(ctl: Control, node_id: str) -> bool:
    """Ask a node to stop (it hands its deployments over as it goes); False when its
    provider cannot stop it (a node started by hand is stopped by hand)."""
    node = ctl.registry.get_node(node_id)
    if node is None:
        return False
    prov = provider(node.get("provider") or ctl.settings.provider)
    if not prov.can_stop(ctl, node):
        return False
    set_node_state(ctl.ports, node_id, STOPPING, expect=LIVE_STATES)
    return prov.stop(ctl, node)


class NodeManager:
    """The provider port of :mod:`dm.ports` over this module and the configured provider."""

    def __init__(self, ctl: Control) -> None:
        self.ctl = ctl

    @property
    def starts_nodes(self) -> bool:
        return provider(self.ctl.settings.provider).starts_nodes

    def add_node(self, nodes: list[NodeView]) -> str | None:
        return add_node(self.ctl, nodes)

    def stop_node(self, node_id: str) -> bool:
        return stop_node(self.ctl, node_id)

    def exited(self) -> list[str]:
        return provider(self.ctl.settings.provider).exited()
