"""Every port of :mod:`dm.ports` in memory, for the unit tests: the domain's rules
(lifecycle, placement, failover, restart policy) run against these with no server, as
dramatiq's tests run against its ``StubBroker``.

The fleet keeps the same figures as the Redis one (capacity, last sample, allocations,
reserved demand) and decides with :mod:`dm.balancer`, which the Redis scripts are held
to by their own tests.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dm import balancer
from dm import keys as k
from dm.balancer import NodeView
from dm.errors import UnknownAlgorithm, UnknownDeployment
from dm.lifecycle import ACTIVE, WAITING, D, NodeState, event_of, event_passing
from dm.models import Demand
from dm.ports import Ports
from dm.settings import Settings

Doc = dict[str, Any]


class MemoryStore:
    def __init__(self) -> None:
        self.docs: dict[str, Doc] = {}
        #: every event, in the order written (the relay's order)
        self.events: list[Doc] = []
        #: set to make the next writes fail (an outage)
        self.fail_with: BaseException | None = None

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def get(self, dep_id: str) -> Doc:
        doc = self.find(dep_id) or self.by_request(dep_id)
        if doc is None:
            raise UnknownDeployment(f"no deployment {dep_id!r}")
        return doc

    def find(self, dep_id: str) -> Doc | None:
        doc = self.docs.get(dep_id)
        return _public(doc) if doc else None

    def by_request(self, request_id: str) -> Doc | None:
        for doc in self.docs.values():
            if doc["request_id"] == request_id:
                return _public(doc)
        return None

    def create(self, doc: Doc) -> tuple[Doc, bool]:
        self._check()
        known = self.by_request(doc["request_id"])
        if known is not None:
            return known, False
        stored = copy.deepcopy(doc)
        self.docs[doc["_id"]] = stored
        self.events.extend(copy.deepcopy(stored.get("history") or []))
        return _public(stored), True

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
        self._check()
        doc = self.docs.get(dep_id)
        if doc is None or doc["state"] not in expect:
            return None
        if generation is not None and doc["generation"] != generation:
            return None
        if current is not None and current.get("rev") != doc["rev"]:
            current = None  # stale: decided again on the stored one, as the Mongo store reads again
        before = _public(doc)
        left = doc["state"]
        doc.update(fields)
        doc.update(state=state, reason=reason, updated_at=time.time(), rev=doc["rev"] + 1)
        if new_generation:
            doc["generation"] += 1
        event = event_of(doc, left)
        doc.setdefault("history", []).append(event)
        self.events.append(dict(event))
        seen(before)
        return _public(doc)

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
        self._check()
        moved = []
        for i, doc in enumerate(docs):
            stored = self.docs.get(doc["_id"])
            if stored is None or stored["rev"] != doc["rev"]:
                continue  # it moved on since it was read
            left = via or stored["state"]
            if via:  # the state passed through: its event only
                passed = event_passing(stored, via, reason, time.time(), via_each[i] if via_each else None)
                stored["rev"] += 1
                stored.setdefault("history", []).append(passed)
                self.events.append(dict(passed))
            stored.update(state=state, reason=reason, updated_at=time.time(), rev=stored["rev"] + 1)
            stored.update(fields)
            stored.update(each[i] if each else {})
            if new_generation:
                stored["generation"] += 1
            event = event_of(stored, left)
            stored.setdefault("history", []).append(event)
            self.events.append(dict(event))
            moved.append(_public(stored))
        return moved

    def active_on(self, node_id: str) -> list[Doc]:
        states = {*ACTIVE, D.STOPPING}
        return [_public(d) for d in self.docs.values() if d.get("node") == node_id and d["state"] in states]

    def waiting(self, limit: int, lost: bool = True) -> list[Doc]:
        states = WAITING if lost else (D.PENDING,)
        rows = sorted((d for d in self.docs.values() if d["state"] in states), key=lambda d: d["created_at"])
        return [_public(d) for d in rows[:limit]]

    def unstarted(self, before: float, limit: int) -> list[Doc]:
        rows = [d for d in self.docs.values() if d["state"] == D.SCHEDULED and d.get("scheduled_at", 0) < before]
        return [_public(d) for d in rows[:limit]]

    def nodes_holding(self, node_ids: list[str]) -> list[str]:
        states = {*ACTIVE, D.STOPPING}
        return sorted({d["node"] for d in self.docs.values() if d.get("node") in node_ids and d["state"] in states})

    def any_waiting(self) -> bool:
        return any(d["state"] in WAITING for d in self.docs.values())

    def active_by_node(self) -> dict[str, dict[str, Demand]]:
        out: dict[str, dict[str, Demand]] = {}
        for d in self.docs.values():
            if d["state"] in ACTIVE and d.get("node"):
                out.setdefault(d["node"], {})[d["_id"]] = Demand.from_dict(d["demand"])
        return out

    def history(self, dep_id: str) -> list[Doc]:
        return list(self.docs[dep_id].get("history") or [])


def _public(doc: Doc) -> Doc:
    out = {k: v for k, v in doc.items() if k != "history"}
    return copy.deepcopy(out)


class MemoryEventLog:
    """Numbered events and the relay's mark, as :class:`dm.registry.Registry` keeps them."""

    def __init__(self) -> None:
        self.rows: list[Doc] = []
        self.mark = 0

    def store(self, event: Doc, seq: int | None = None) -> int:
        seq = seq if seq is not None else len(self.rows) + 1
        self.rows.append({**event, "_id": seq, "seq": seq})
        return seq

    def events_mark(self) -> int:
        return self.mark

    def events_between(self, after: int, upto: int, query: Doc, limit: int = 0) -> list[Doc]:
        rows = sorted((r for r in self.rows if after < r["_id"] <= upto), key=lambda r: r["_id"])
        rows = [r for r in rows if all(r.get(k) == v for k, v in query.items())]
        return [dict(r) for r in (rows[:limit] if limit else rows)]


class MemoryNodes:
    def __init__(self) -> None:
        self.docs: dict[str, Doc] = {}

    def get_node(self, node_id: str) -> Doc | None:
        doc = self.docs.get(node_id)
        return dict(doc) if doc else None

    def upsert_node(self, node_id: str, **fields: Any) -> None:
        self.docs.setdefault(node_id, {"_id": node_id, "created_at": time.time()}).update(fields)

    def set_node_state(self, node_id: str, state: str, expect: Iterable[str] | None = None) -> bool:
        doc = self.docs.get(node_id)
        if doc is None or (expect is not None and doc.get("state") not in list(expect)):
            return False
        doc["state"] = str(state)
        return True

    def list_nodes(self, states: Iterable[str] | None = None) -> list[Doc]:
        wanted = None if states is None else set(states)
        return [dict(d) for _, d in sorted(self.docs.items()) if wanted is None or d.get("state") in wanted]


class MemoryCatalogue:
    def __init__(self) -> None:
        self.docs: dict[str, Doc] = {}

    def add(self, name: str, *, cpu: float = 0.1, memory: float = 64.0, restart: Doc | None = None,
            args: Any = None, version: str = "1") -> Doc:  # fmt: skip
        doc = {
            "_id": f"{name}:{version}",
            "name": name,
            "version": version,
            "sha256": uuid.uuid4().hex,
            "spec": {
                "name": name,
                "version": version,
                "command": ["python", "main.py"],
                "demand": {"cpu": cpu, "memory": memory},
                "restart": restart or {"policy": "on-failure", "max_restarts": 3, "backoff": 0.5, "backoff_max": 30},
                "env": {},
                "args": args,
            },
        }
        self.docs[name] = doc
        return doc

    def algorithm(self, name: str, version: str | None = None) -> Doc:
        doc = self.docs.get(name)
        if doc is None or (version and doc["version"] != version):
            raise UnknownAlgorithm(f"unknown algorithm {name!r}")
        return doc


@dataclass
class MemoryNode:
    cpus: float
    memory: float
    state: str = NodeState.UP.value
    cpu: float = 0.0
    ram: float = 0.0
    ts: float | None = None
    since: float = field(default_factory=time.time)
    allocs: dict[str, Doc] = field(default_factory=dict)
    lease: bool = True
    present: bool = True


class _Lock:
    def __init__(self, fleet: MemoryFleet, name: str, token: str) -> None:
        self.fleet, self.name, self.token = fleet, name, token

    def release(self, pipe: Any = None) -> None:
        self.fleet.unlock(self.name, self.token)


class MemoryFleet:
    def __init__(self) -> None:
        self.nodes: dict[str, MemoryNode] = {}
        self.locks: dict[str, str] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.values: dict[str, str] = {}
        self.server = "run-1"
        self.seq = 0
        #: True: presence cannot be seen (CLIENT LIST not allowed)
        self.no_presence = False

    def add(self, node_id: str, cpus: float = 1.0, memory: float = 1024.0, **kw: Any) -> MemoryNode:
        node = self.nodes[node_id] = MemoryNode(cpus=cpus, memory=memory, **kw)
        self.seq = max(self.seq, int(node_id) if node_id.isdigit() else 0)
        return node

    def _view(self, node_id: str, n: MemoryNode, settle: float) -> NodeView:
        cutoff = (n.ts or 0.0) - settle
        recent = [a for a in n.allocs.values() if a["ts"] > cutoff]
        return NodeView(
            id=node_id, state=n.state, cpus=n.cpus, memory=n.memory, cpu=n.cpu, ram=n.ram,
            committed_cpu=round(sum(a["cpu"] for a in n.allocs.values()), 6),
            committed_memory=round(sum(a["memory"] for a in n.allocs.values()), 6),
            reserved_cpu=round(sum(a["cpu"] for a in recent), 6),
            reserved_memory=round(sum(a["memory"] for a in recent), 6),
            deployments=len(n.allocs),
        )  # fmt: skip

    def place_lock(
        self, demand: Demand, threshold: float, policy: str, settle: float
    ) -> tuple[_Lock, str | None, float | None]:
        token = self.try_lock("placement", 30.0)
        if token is None:
            raise RuntimeError("the placement lock is held (a unit test left it taken)")
        lock = _Lock(self, "placement", token)
        if policy not in ("min", "max"):
            return lock, None, None
        chosen = balancer.choose(self.snapshot(settle), demand, threshold, policy)
        if chosen is None:
            return lock, None, None
        return lock, chosen.id, balancer.score(chosen)

    def place_many_lock(
        self, wants: list[tuple[str, Demand, int]], threshold: float, policy: str, settle: float
    ) -> tuple[_Lock, list[tuple[str | None, float]]]:
        token = self.try_lock("placement", 30.0)
        if token is None:
            raise RuntimeError("the placement lock is held (a unit test left it taken)")
        picks: list[tuple[str | None, float]] = []
        for dep_id, demand, _ in wants:
            chosen = balancer.choose(self.snapshot(settle), demand, threshold, policy)
            if chosen is None:
                picks.append((None, 0.0))
            else:
                self.allocate(chosen.id, dep_id, demand)
                picks.append((chosen.id, balancer.score(chosen)))
        return _Lock(self, "placement", token), picks

    def snapshot(self, settle: float) -> list[NodeView]:
        return [self._view(i, n, settle) for i, n in sorted(self.nodes.items())]

    def node_hashes(self) -> dict[str, dict[str, str]]:
        out = {}
        for node_id, n in self.nodes.items():
            h = {"cpus": str(n.cpus), "memory": str(n.memory), "state": n.state, "since": repr(n.since)}
            if n.ts is not None:
                h.update(cpu=str(n.cpu), ram=str(n.ram), ts=repr(n.ts))
            out[node_id] = h
        return out

    def dead_nodes(self) -> list[str]:
        return sorted(i for i, n in self.nodes.items() if n.state == "dead")

    def live_counts(self) -> list[tuple[str, str, int]]:
        live = ("up", "starting", "stopping")
        return [(i, n.state, len(n.allocs)) for i, n in sorted(self.nodes.items()) if n.state in live]

    def observe(self) -> dict[str, dict[str, str]]:
        live = ("up", "starting", "stopping")
        out = {}
        for node_id, h in self.node_hashes().items():
            if h["state"] in live:
                lease = "1" if self.nodes[node_id].lease else "0"
                out[node_id] = {"state": h["state"], "since": h["since"], "lease": lease,
                                **({"ts": "1"} if "ts" in h else {})}  # fmt: skip
        return out

    def leases(self, node_ids: Iterable[str]) -> dict[str, bool]:
        return {i: bool(self.nodes.get(i) and self.nodes[i].lease) for i in node_ids}

    def present(self) -> set[str] | None:
        if self.no_presence:
            return None
        return {i for i, n in self.nodes.items() if n.present}

    def server_id(self) -> str:
        return self.server

    def set_state(self, node_id: str, state: str) -> None:
        if node_id in self.nodes:
            self.nodes[node_id].state = str(state)
        if str(state) != "dead":  # as the Redis fleet: a node back is looked at again when it dies
            self.hashes.get(k.MOVED_OFF, {}).pop(node_id, None)

    def release(self, node_id: str, dep_id: str) -> None:
        if node_id in self.nodes:
            self.nodes[node_id].allocs.pop(dep_id, None)

    def clear_allocations(self, node_id: str) -> None:
        if node_id in self.nodes:
            self.nodes[node_id].allocs.clear()

    def allocations(self, node_id: str) -> dict[str, dict[str, Any]]:
        return dict(self.nodes[node_id].allocs) if node_id in self.nodes else {}

    def allocate(self, node_id: str, dep_id: str, demand: Demand, ts: float | None = None) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            node.allocs[dep_id] = {"cpu": demand.cpu, "memory": demand.memory, "ts": time.time() if ts is None else ts}

    def register(self, node_id: str, *, cpus: float, memory: float, state: str, host: str = "") -> None:
        self.add(node_id, cpus=cpus, memory=memory, state=str(state), lease=False)

    def next_node_id(self) -> str:
        self.seq += 1
        return str(self.seq)

    def try_lock(self, name: str, seconds: float) -> str | None:
        if name in self.locks:
            return None
        token = uuid.uuid4().hex
        self.locks[name] = token
        return token

    def unlock(self, name: str, token: str) -> None:
        if self.locks.get(name) == token:
            del self.locks[name]

    def extend_lock(self, name: str, token: str, seconds: float) -> bool:
        return self.locks.get(name) == token

    def marks(self, name: str) -> dict[str, str]:
        return dict(self.hashes.get(name, {}))

    def set_marks(self, name: str, values: dict[str, str], drop: Iterable[str] = ()) -> None:
        h = self.hashes.setdefault(name, {})
        for key in drop:
            h.pop(key, None)
        h.update(values)

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def put(self, key: str, value: str) -> None:
        self.values[key] = value


class MemoryDispatcher:
    def __init__(self, fleet: MemoryFleet) -> None:
        self.fleet = fleet
        #: (kind, deployment id, node, generation) of every order sent
        self.orders: list[tuple[str, str, str | None, int]] = []
        self.placements: list[str] = []

    def run(self, doc: Doc, demand: Demand | None, lock: Any) -> None:
        if demand is not None:
            self.fleet.allocate(doc["node"], doc["_id"], demand)
        if lock is not None:
            lock.release()
        self.orders.append(("run", doc["_id"], doc["node"], doc["generation"]))

    def run_many(self, docs: list[Doc], lock: Any) -> None:
        if lock is not None:
            lock.release()
        self.orders += [("run", doc["_id"], doc["node"], doc["generation"]) for doc in docs]

    def kill(self, doc: Doc, reason: str) -> None:
        self.orders.append(("kill", doc["_id"], doc.get("node"), doc["generation"]))

    def place_later(self, dep_id: str) -> None:
        self.placements.append(dep_id)

    def runs(self) -> list[tuple[str, str | None, int]]:
        return [(d, n, g) for kind, d, n, g in self.orders if kind == "run"]


class MemoryProvider:
    """Starts nodes of the settings' size in the memory fleet (``starting``), as the local
    provider would; ``starts_nodes=False`` behaves as ``static``."""

    def __init__(self, fleet: MemoryFleet, nodes: MemoryNodes, settings: Settings, starts_nodes: bool = True) -> None:
        self.fleet, self.book, self.settings = fleet, nodes, settings
        self.starts_nodes = starts_nodes
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.gone: list[str] = []
        self.stoppable = True

    def add_node(self, nodes: list[NodeView]) -> str | None:
        s = self.settings
        node_id = self.fleet.next_node_id()
        self.fleet.register(node_id, cpus=s.node_cpus, memory=s.node_memory, state=NodeState.STARTING)
        self.book.upsert_node(node_id, state=NodeState.STARTING.value, cpus=s.node_cpus, memory=s.node_memory)
        self.started.append(node_id)
        return node_id

    def stop_node(self, node_id: str) -> bool:
        if not self.stoppable:
            return False
        self.stopped.append(node_id)
        self.book.set_node_state(node_id, NodeState.STOPPING.value)
        self.fleet.set_state(node_id, NodeState.STOPPING.value)
        return True

    def exited(self) -> list[str]:
        return list(self.gone)


@dataclass
class MemoryPorts(Ports):
    """:class:`dm.ports.Ports` whose parts are the memory ones (typed, for the tests)."""

    store: MemoryStore = field(default_factory=MemoryStore)
    nodes: MemoryNodes = field(default_factory=MemoryNodes)
    catalogue: MemoryCatalogue = field(default_factory=MemoryCatalogue)
    fleet: MemoryFleet = field(default_factory=MemoryFleet)
    dispatcher: MemoryDispatcher = None  # type: ignore[assignment]
    provider: MemoryProvider = None  # type: ignore[assignment]

    def add_node(self, node_id: str, cpus: float = 1.0, memory: float = 1024.0, **kw: Any) -> MemoryNode:
        """A node that is up (in the fleet and the registry)."""
        node = self.fleet.add(node_id, cpus=cpus, memory=memory, **kw)
        self.nodes.upsert_node(node_id, state=node.state, cpus=cpus, memory=memory)
        return node


def memory_ports(settings: Settings | None = None, *, starts_nodes: bool = True, **changes: Any) -> MemoryPorts:
    """Ports with nothing in them but the settings (``changes`` override fields)."""
    s = (settings or Settings(redis_url="memory://", mongo_url="memory://")).with_(**changes)
    store, nodes, fleet = MemoryStore(), MemoryNodes(), MemoryFleet()
    dispatcher = MemoryDispatcher(fleet)
    provider = MemoryProvider(fleet, nodes, s, starts_nodes=starts_nodes)
    return MemoryPorts(
        settings=s, store=store, nodes=nodes, catalogue=MemoryCatalogue(), fleet=fleet, dispatcher=dispatcher,
        provider=provider, is_outage=lambda exc: isinstance(exc, ConnectionError),
    )  # fmt: skip
