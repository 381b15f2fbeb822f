"""Placement: choose the node for a deployment, as a pure function of what we know.

Like a cluster scheduler, a decision goes filter -> score -> pick:

1. **Filter** (:func:`fits`): keep nodes that are ``up`` or ``starting`` and where the
   effective usage plus the algorithm's declared demand stays at or under the
   threshold (default 80%) on *both* cpu and ram.
2. **Score** (:func:`score`): ``load = 1 / (1/cpu + 1/ram)`` of the effective usage,
   0 when either is 0 (the formula of the original design).
3. **Pick** (:func:`choose`): by policy: ``min`` (spread: lowest load), ``max`` (bin
   packing: highest load) or ``p2c`` (power of two choices: the lower of two random
   fitting nodes). Ties go to fewer deployments, then the smaller id.

Metrics are seconds old, so the effective usage of a node (:func:`effective_usage`) is
the larger of what it measured plus what was placed on it since (its *reservation*),
and what its active deployments declared (its *commitment*). Without the reservation a
burst of deploys would all see the same idle node and herd onto it.

Nothing here does I/O. The caller reads the node views, decides, and records the
reservation (:func:`with_reservation` shows its effect) under one lock: two deployers
deciding from the same snapshot would both see room that only one of them can have.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from dm.errors import ConfigError
from dm.models import Demand

#: placement policies, chosen by config
POLICIES = ("min", "max", "p2c")
#: node states that can take a deployment (a starting node's queue holds the task)
CANDIDATE_STATES = ("up", "starting")
#: default ceiling, in percent of capacity, on both cpu and ram
DEFAULT_THRESHOLD = 80.0

# Percentages come from float division (0.8 core of 1 is 80.00000000000001%), so a
# demand that lands exactly on the threshold is not refused over a rounding error.
_EPSILON = 1e-9


@dataclass(frozen=True)
class NodeView:
    """What placement knows about one node; usage in percent, capacity in cores/MiB."""

    id: str
    #: "up" | "starting" | "dead" | "stopping"; only up/starting are candidates
    state: str
    #: declared capacity, cores
    cpus: float
    #: declared capacity, MiB
    memory: float
    #: measured usage, percent of capacity (0-100)
    cpu: float = 0.0
    #: measured usage, percent of capacity (0-100)
    ram: float = 0.0
    #: declared cores of the active deployments on the node
    committed_cpu: float = 0.0
    #: declared MiB of the active deployments on the node
    committed_memory: float = 0.0
    #: declared cores placed since the last metrics sample settled (not yet in ``cpu``)
    reserved_cpu: float = 0.0
    #: declared MiB placed since the last metrics sample settled (not yet in ``ram``)
    reserved_memory: float = 0.0
    deployments: int = 0


def load(cpu: float, ram: float) -> float:
    """``1 / (1/cpu + 1/ram)``, or 0.0 when either is <= 0."""
    if cpu <= 0 or ram <= 0:
        return 0.0
    return 1.0 / (1.0 / cpu + 1.0 / ram)


def _percent(amount: float, capacity: float) -> float:
    """``amount`` as a percent of ``capacity``; any amount of no capacity is too much."""
    if capacity <= 0:
        return 0.0 if amount <= 0 else float("inf")
    return amount / capacity * 100.0


def effective_usage(node: NodeView) -> tuple[float, float]:
    """(cpu, ram) in percent: max(measured + reserved, committed), per resource."""
    cpu = max(
        node.cpu + _percent(node.reserved_cpu, node.cpus),
        _percent(node.committed_cpu, node.cpus),
    )
    ram = max(
        node.ram + _percent(node.reserved_memory, node.memory),
        _percent(node.committed_memory, node.memory),
    )
    return cpu, ram


def fits(node: NodeView, demand: Demand, threshold: float) -> bool:
    """Whether ``node`` can take ``demand`` and stay at or under ``threshold`` percent."""
    if node.state not in CANDIDATE_STATES or node.cpus <= 0 or node.memory <= 0:
        return False
    cpu, ram = effective_usage(node)
    limit = threshold + _EPSILON
    return cpu + _percent(demand.cpu, node.cpus) <= limit and ram + _percent(demand.memory, node.memory) <= limit


def score(node: NodeView) -> float:
    """The node's load: :func:`load` of its effective usage."""
    return load(*effective_usage(node))


def _lowest(node: NodeView) -> tuple[float, int, str]:
    return score(node), node.deployments, node.id


def _highest(node: NodeView) -> tuple[float, int, str]:
    return -score(node), node.deployments, node.id


def choose(
    nodes: Iterable[NodeView],
    demand: Demand,
    threshold: float = DEFAULT_THRESHOLD,
    policy: str = "min",
    rng: random.Random | None = None,
) -> NodeView | None:
    """The node to place ``demand`` on, or None when no node fits.

    ``rng`` is used by ``p2c`` only; pass a seeded one for a repeatable choice.
    Raises :class:`~dm.errors.ConfigError` for a policy not in :data:`POLICIES`.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown placement policy {policy!r}: use one of {', '.join(POLICIES)}")
    # Sorted so that a seeded rng gives the same choice whatever the input order.
    candidates = sorted(
        (node for node in nodes if fits(node, demand, threshold)),
        key=lambda node: node.id,
    )
    if not candidates:
        return None
    if policy == "max":
        return min(candidates, key=_highest)
    if policy == "p2c" and len(candidates) > 2:
        candidates = (rng or random.Random()).sample(candidates, 2)
    return min(candidates, key=_lowest)


def with_reservation(node: NodeView, demand: Demand) -> NodeView:
    """``node`` as it is once ``demand`` is placed on it and its metrics lag behind."""
    return replace(
        node,
        reserved_cpu=node.reserved_cpu + demand.cpu,
        reserved_memory=node.reserved_memory + demand.memory,
        committed_cpu=node.committed_cpu + demand.cpu,
        committed_memory=node.committed_memory + demand.memory,
        deployments=node.deployments + 1,
    )
