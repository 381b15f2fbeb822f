"""The ports of the domain: what the deployer, the reconcilers and the node's supervisor
need of the servers, as small interfaces.

- :class:`DeploymentStore`: deployments (MongoDB: :mod:`dm.adapters.mongo`);
- :class:`NodeBook`: the nodes' durable record (MongoDB);
- :class:`EventLog`: the numbered events the relay stored (MongoDB), read by one cursor;
- :class:`Catalogue`: algorithm documents (MongoDB + GridFS, cached);
- :class:`Fleet`: capacity, usage, leases, presence, allocations, locks (Redis:
  :mod:`dm.adapters.redis_fleet`);
- :class:`Dispatcher`: run and kill orders to nodes, placements to the control queue
  (Celery: :mod:`dm.adapters.celery_dispatch`).

:mod:`dm.adapters.memory` implements every one in memory, for the unit tests (as
dramatiq's ``StubBroker`` stands in for a broker). A :class:`Ports` bundles them with the
settings and the node manager's hooks, so a domain function takes one argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dm.balancer import NodeView
from dm.models import Demand
from dm.settings import Settings

Doc = dict[str, Any]


class DeploymentStore(Protocol):
    def get(self, dep_id: str) -> Doc:
        """By id or request id; :class:`dm.errors.UnknownDeployment` if none."""
        ...

    def find(self, dep_id: str) -> Doc | None: ...

    def by_request(self, request_id: str) -> Doc | None: ...

    def create(self, doc: Doc) -> tuple[Doc, bool]:
        """Insert a new deployment; (the first one, False) when its request id is known."""
        ...

    def compare_and_set(
        self,
        dep_id: str,
        state: str,
        *,
        expect: list[str],
        generation: int | None,
        reason: str,
        new_generation: bool,
        current: Doc | None,
        seen: Callable[[Doc], None],
        fields: dict[str, Any],
    ) -> Doc | None:
        """The one write of a move (with its event); only :func:`dm.lifecycle.transition` calls it.
        ``seen`` is given the document the write was made from."""
        ...

    def compare_and_set_many(
        self,
        docs: list[Doc],
        state: str,
        *,
        reason: str,
        fields: dict[str, Any],
        each: list[dict[str, Any]] | None = None,
        new_generation: bool = False,
        via: str | None = None,
        via_each: list[dict[str, Any]] | None = None,
    ) -> list[Doc]:
        """Move each document, as read, to ``state`` (a compare-and-set on its id and rev each,
        with its event), in one write; returns the new documents of those moved. ``each``: fields
        of each document's own (its node, its reason), over ``fields``. With ``via``, each goes
        through that state on the way, in the same write: its event first (with ``via_each``'s
        fields, its reason), then the move's (two revs). Only
        :func:`dm.lifecycle.transition_many` calls it."""
        ...

    def active_on(self, node_id: str) -> list[Doc]:
        """Deployments of a node in an active state or ``stopping``."""
        ...

    def waiting(self, limit: int, lost: bool = True) -> list[Doc]:
        """``pending`` and (unless not ``lost``) ``lost`` deployments, oldest first."""
        ...

    def unstarted(self, before: float, limit: int) -> list[Doc]:
        """``scheduled`` deployments placed before ``before``."""
        ...

    def nodes_holding(self, node_ids: list[str]) -> list[str]:
        """Which of these nodes still hold active or stopping deployments."""
        ...

    def any_waiting(self) -> bool: ...

    def active_by_node(self) -> dict[str, dict[str, Demand]]:
        """node -> deployment id -> demand, of every active deployment (to rebuild allocations)."""
        ...


class EventLog(Protocol):
    """The events the relay stored, numbered (``seq``) in the registry's order, and the mark
    up to which every numbered event is stored; read by :class:`dm.registry.EventCursor`."""

    def events_mark(self) -> int: ...

    def events_between(self, after: int, upto: int, query: Doc, limit: int = 0) -> list[Doc]: ...


class NodeBook(Protocol):
    def get_node(self, node_id: str) -> Doc | None: ...

    def upsert_node(self, node_id: str, **fields: Any) -> None: ...

    def set_node_state(self, node_id: str, state: str, expect: Iterable[str] | None = None) -> bool: ...

    def list_nodes(self, states: Iterable[str] | None = None) -> list[Doc]: ...


class Catalogue(Protocol):
    def algorithm(self, name: str, version: str | None = None) -> Doc: ...


class Lock(Protocol):
    def release(self, pipe: Any = None) -> None: ...


class Fleet(Protocol):
    def place_lock(
        self, demand: Demand, threshold: float, policy: str, settle: float
    ) -> tuple[Lock, str | None, float | None]:
        """Take the placement lock and, for the policies the fleet decides itself, choose:
        (lock, node id or None, its score). Raises after waiting too long for the lock."""
        ...

    def place_many_lock(
        self, wants: list[tuple[str, Demand, int]], threshold: float, policy: str, settle: float
    ) -> tuple[Lock, list[tuple[str | None, float]]]:
        """Take the placement lock and choose a node for each (deployment id, demand, the
        generation it is placed in), allocating
        each on its node as it goes so the next choice counts it (policies ``min`` and ``max``):
        (lock, [(node id or None, its score)] in order). The caller releases the allocation of a
        deployment whose registry write is refused."""
        ...

    def snapshot(self, settle: float) -> list[NodeView]: ...

    def node_hashes(self) -> dict[str, dict[str, str]]: ...

    def dead_nodes(self) -> list[str]:
        """The registered nodes in state ``dead`` (without reading the others)."""
        ...

    def live_counts(self) -> list[tuple[str, str, int]]:
        """(node id, state, deployments) of every live node (up, starting, stopping)."""
        ...

    def leases(self, node_ids: Iterable[str]) -> dict[str, bool]: ...

    def observe(self) -> dict[str, dict[str, str]]:
        """The live nodes (up, starting, stopping), in one read: id -> {state, since, lease
        ('1' held, '0' not), ts (present once it has published a sample)}."""
        ...

    def present(self) -> set[str] | None:
        """Node ids with a presence connection open; None when that cannot be seen."""
        ...

    def server_id(self) -> str:
        """The identity of the server's current run (Redis ``run_id``)."""
        ...

    def set_state(self, node_id: str, state: str) -> None: ...

    def release(self, node_id: str, dep_id: str) -> None: ...

    def clear_allocations(self, node_id: str) -> None: ...

    def allocations(self, node_id: str) -> dict[str, dict[str, Any]]: ...

    def allocate(self, node_id: str, dep_id: str, demand: Demand) -> None: ...

    def register(self, node_id: str, *, cpus: float, memory: float, state: str, host: str = "") -> None: ...

    def next_node_id(self) -> str: ...

    def try_lock(self, name: str, seconds: float) -> str | None:
        """A short lock of a reconciler kind; its token, or None when another holds it."""
        ...

    def unlock(self, name: str, token: str) -> None: ...

    def extend_lock(self, name: str, token: str, seconds: float) -> bool:
        """Hold a lock of :meth:`try_lock` ``seconds`` more; False when it is no longer ``token``'s."""
        ...

    def marks(self, name: str) -> dict[str, str]:
        """A small hash of the reconcilers' memory (absent since, idle since, ...)."""
        ...

    def set_marks(self, name: str, values: dict[str, str], drop: Iterable[str] = ()) -> None: ...

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...


class Dispatcher(Protocol):
    def run(self, doc: Doc, demand: Demand | None, lock: Lock | None) -> None:
        """Record the allocation, release ``lock`` and send the run order (one round trip
        where the adapters allow)."""
        ...

    def run_many(self, docs: list[Doc], lock: Lock | None) -> None:
        """Release ``lock`` and send the run orders of deployments whose allocations are recorded
        (one round trip where the adapters allow)."""
        ...

    def kill(self, doc: Doc, reason: str) -> None: ...

    def place_later(self, dep_id: str) -> None:
        """Ask a control worker to place a deployment (after a node handed it back)."""
        ...


class Provider(Protocol):
    """What the reconcilers need of the node manager."""

    @property
    def starts_nodes(self) -> bool: ...

    def add_node(self, nodes: list[NodeView]) -> str | None: ...

    def stop_node(self, node_id: str) -> bool: ...

    def exited(self) -> list[str]: ...


@dataclass
class Ports:
    settings: Settings
    store: DeploymentStore
    nodes: NodeBook
    catalogue: Catalogue
    fleet: Fleet
    dispatcher: Dispatcher
    provider: Provider
    #: True for an error that means a server is out of reach for now (retry, never give up)
    is_outage: Callable[[BaseException], bool] = field(default=lambda exc: False)
