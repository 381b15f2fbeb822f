"""The largest node the configured provider can give, and demand that could never fit on it.

A deployment declaring more than any node can hold would start a node on every
deploy and then wait ``pending`` forever; it is refused up front instead, at
``dm algorithms add`` (and, through the same function, at deploy). The largest node:

- ``local``: the size it starts nodes with (``DM_NODE_CPUS``, ``DM_NODE_MEMORY``);
- ``command``: that size too (the template gets it as ``{cpus}`` ``{memory}``), or a larger
  node that registered itself;
- ``static``: the largest node that registered itself and has not stopped; with none
  registered yet it is unknown, and nothing is refused (a node may come later).

A demand fits when an empty node of that size takes it under the placement threshold
(:func:`dm.balancer.fits`, the same rule placement applies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm.balancer import NodeView, fits
from dm.errors import NoCapacity
from dm.models import Demand
from dm.settings import Settings

if TYPE_CHECKING:
    from dm.registry import Registry

#: providers that start nodes of the configured size
SIZED_PROVIDERS = ("local", "command")


def largest_node(settings: Settings, registry: Registry | None = None) -> tuple[float, float] | None:
    """(cpus, memory MiB) of the largest node the provider can start or has (by cpu, then
    memory), or None if unknown."""
    sizes = node_sizes(settings, registry)
    return max(sizes) if sizes else None


def node_sizes(settings: Settings, registry: Registry | None = None) -> list[tuple[float, float]]:
    """The (cpus, memory MiB) of each kind of node the provider can start or has."""
    sizes: list[tuple[float, float]] = []
    if settings.provider in SIZED_PROVIDERS:
        sizes.append((settings.node_cpus, settings.node_memory))
    if settings.provider != "local":
        if registry is None and settings.mongo_url:
            from dm.registry import Registry

            registry = Registry(settings.mongo_url, settings.database)
        if registry is not None:
            nodes = registry.list_nodes(["starting", "up", "stopping", "dead"])
            sizes += [(float(n["cpus"]), float(n["memory"])) for n in nodes if n.get("cpus") and n.get("memory")]
    return sorted(set(sizes))


def check_demand(name: str, demand: Demand, settings: Settings, registry: Registry | None = None) -> None:
    """Raise NoCapacity, naming the node size, when ``demand`` fits no node the provider can have."""
    sizes = node_sizes(settings, registry)
    if not sizes or any(fits(NodeView("empty", "up", *size), demand, settings.threshold) for size in sizes):
        return
    cpus, memory = max(sizes)
    share = settings.threshold / 100
    over = [f"{demand.cpu:g} cpu"] if demand.cpu > cpus * share + 1e-9 else []
    over += [f"{demand.memory:g} MiB"] if demand.memory > memory * share + 1e-9 else []
    where = "starts" if settings.provider in SIZED_PROVIDERS else "has registered"
    raise NoCapacity(
        f"{name} declares {' and '.join(over)}, but the largest node provider {settings.provider!r} {where} "
        f"has {cpus:g} cpu and {memory:g} MiB, of which placement uses at most {settings.threshold:g}% "
        f"({cpus * share:g} cpu, {memory * share:g} MiB): lower cpu/memory in algorithm.toml, or give "
        "bigger nodes (DM_NODE_CPUS, DM_NODE_MEMORY; `dm node --cpus --memory`)"
    )
