"""Node providers: how the node manager gets a node started, and stopped, somewhere.

- ``local`` (:mod:`dm.providers.local`): node agents as processes of this machine;
- ``command`` (:mod:`dm.providers.command`): a command template that starts a node
  elsewhere (``ssh {host} dm node --id {node_id} ...``), and one that stops it;
- ``static`` (:mod:`dm.providers.static`): nodes started by hand with ``dm node`` on
  each host; the node manager uses what registered itself and starts nothing.

Choose one with ``DM_PROVIDER``. A provider instance lives as long as its process, so
the local one can watch the children it started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from dm.errors import ConfigError

if TYPE_CHECKING:
    from dm.control import Control
    from dm.registry import Doc


class Provider(Protocol):
    #: recorded on each node it starts, so the node is stopped by the same provider
    name: str
    #: False when the node manager must never start a node (``add_node`` returns None)
    starts_nodes: bool

    def choose_host(self, ctl: Control) -> str:
        """Where the next node goes (a host name; recorded as the node's ``provider_host``)."""
        ...

    def start(self, ctl: Control, node_id: str, cpus: float, memory: float, host: str) -> int | None:
        """Start a node agent with this id on ``host``; returns a local PID when there is one."""
        ...

    def can_stop(self, ctl: Control, node: Doc) -> bool: ...

    def stop(self, ctl: Control, node: Doc) -> bool:
        """Ask the node to stop (it hands its deployments over as it goes); True if asked."""
        ...

    def exited(self) -> list[str]:
        """Node ids whose agent is known to have exited: a faster signal than the lease."""
        ...


#: provider name -> its module (imported on first use)
KNOWN = ("local", "command", "static")

_instances: dict[str, Provider] = {}


def get(name: str) -> Provider:
    """The process-wide instance of the named provider."""
    if name not in _instances:
        if name == "local":
            from dm.providers.local import LocalProvider

            _instances[name] = LocalProvider()
        elif name == "command":
            from dm.providers.command import CommandProvider

            _instances[name] = CommandProvider()
        elif name == "static":
            from dm.providers.static import StaticProvider

            _instances[name] = StaticProvider()
        else:
            raise ConfigError(f"unknown node provider {name!r} (DM_PROVIDER); known: {', '.join(KNOWN)}")
    return _instances[name]
