"""Nodes started by hand, one ``dm node --redis URL --mongo URL`` per host.

Each node registers itself (id, address, capacity); the node manager places on what
is registered and never starts or stops a node: when every node is full, a deployment
waits as ``pending`` until someone starts another node or room appears.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dm.control import Control
    from dm.registry import Doc


class StaticProvider:
    name = "static"
    starts_nodes = False

    def choose_host(self, ctl: Control) -> str:
        return ""

    def start(self, ctl: Control, node_id: str, cpus: float, memory: float, host: str) -> int | None:
        return None

    def can_stop(self, ctl: Control, node: Doc) -> bool:
        return False  # whoever started it by hand stops it (SIGTERM hands its deployments over)

    def stop(self, ctl: Control, node: Doc) -> bool:
        return False

    def exited(self) -> list[str]:
        return []
