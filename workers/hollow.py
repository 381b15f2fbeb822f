"""Hollow nodes, as Kubernetes' kubemark: many simulated nodes in one process, each speaking
the node's real protocol, so the control plane can be measured at the scale of a large fleet
on one machine. ``dm node --hollow N`` runs N of them.

Each hollow node, like a node agent (:mod:`workers.agent`):

- takes a new id from ``dm:node_seq``, registers in Redis (:func:`dm.fleet.register_node`)
  and in the registry (``starting`` -> ``up``);
- holds its own presence connection (a Redis connection named ``dm-node-<id>`` blocked on
  ``dm:presence:<id>``) and renews its lease with a metrics sample (:func:`dm.fleet.publish`);
- takes ``dm.run`` and ``dm.kill`` from its own queue ``node.<id>`` (the messages the control
  plane sends, in kombu's Redis envelope: see :mod:`dm.sender`) and reports through the real
  outbox (:class:`workers.outbox.Outbox`): ``running`` with a pid, ``stopped``, and the exit
  the order's args ask for (``{"hollow_exit_after": s, "hollow_exit_code": n}``; without
  them it runs until stopped) with the restart policy applied as the supervisor does;
- kills a copy whose deployment moved on (the ownership check), reports its copies ``lost``
  when its lease lapses, and rejoins empty when it finds itself declared dead.

Only the process start is simulated: no package is fetched and nothing is spawned; a
node's usage is the declared demand of what it runs. The cost per node is kept small: one
thread renews every lease in one pipeline, one thread watches every presence socket, one
connection pops every queue (``BRPOP`` over all of them), and a few worker threads share
the nodes (each node always on the same thread, so its reports stay in order). Redis
brokers only (dm's own default), as :mod:`dm.sender`.

A single hollow node can be killed as ``kill -9`` would: add its id to the Redis set
``dm:hollow:kill`` (any hollow process holding that node drops its presence connection,
stops renewing its lease and consuming its queue, and reports nothing more). Several
hollow processes may run at once; on SIGTERM each hands its nodes' deployments back as a
node agent does.

    dm node --hollow 200 [--cpus 16 --memory 65536 --threads 4]
"""

from __future__ import annotations

import argparse
import base64
import heapq
import itertools
import json
import logging
import os
import queue
import resource
import selectors
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from dm import constants as c
from dm import fleet, node_manager
from dm import keys as k
from dm.control import Control
from dm.models import (
    ACTIVE_STATES,
    FAILED,
    LOST,
    RESTARTING,
    RUNNING,
    SCHEDULED,
    STOPPED,
    STOPPING,
    SUCCEEDED,
    MetricsSample,
    RestartPolicy,
)
from dm.registry import Doc
from dm.registry.base import find_in
from dm.settings import Settings
from workers.outbox import Outbox
from workers.supervisor import placed_here
from workers.watchdog import FENCE_FRACTION

log = logging.getLogger("dm.hollow")

#: Redis set of hollow node ids to kill (as ``kill -9`` would): for benchmarks and tests
KILL_KEY = k.HOLLOW_KILL
#: fake pids start here: above any Linux pid_max, so no real process is ever named
FAKE_PID_BASE = 10_000_000
#: seconds each presence call blocks (as :class:`workers.metrics.Presence`)
PRESENCE_POLL = 5
#: seconds between ownership checks of a worker thread's copies, and between those of all
#: of them against the registry (as the supervisor's)
FENCE_CHECK_INTERVAL = 2.0
REGISTRY_CHECK_INTERVAL = 30.0
#: seconds before a start that waits (lease lapsed) is tried again
START_RETRY = 0.5
#: seconds each BRPOP blocks: a killed node's queue leaves the key list by then
POP_TIMEOUT = 1


# -- one pipeline for every node's lease and sample ------------------------------------


def publish_all(r: redis.Redis, samples: list[MetricsSample], lease_ttl: float, token: str) -> dict[str, Any]:
    """:func:`dm.fleet.publish` for many nodes in one round trip: node id -> what it returned."""
    return dict(fleet.publish_many(r, samples, lease_ttl, token))


# -- the nodes -------------------------------------------------------------------------


@dataclass
class Copy:
    """What a hollow node runs for one deployment (no process: a fake pid)."""

    payload: dict[str, Any]
    pid: int = 0
    restarts: int = 0
    #: the registry state a start expects: scheduled, or restarting for a restart
    expect: str = SCHEDULED
    running: bool = False

    @property
    def dep_id(self) -> str:
        return str(self.payload["id"])

    @property
    def generation(self) -> int:
        return int(self.payload["generation"])

    @property
    def demand(self) -> tuple[float, float]:
        demand = self.payload.get("demand") or {}
        return float(demand.get("cpu", 0.0)), float(demand.get("memory", 0.0))


@dataclass
class Node:
    id: str
    cpus: float
    memory: float
    outbox: Outbox
    worker: int
    copies: dict[str, Copy] = field(default_factory=dict)
    alive: bool = True
    #: demand of what it runs (its usage, published with each lease)
    used_cpu: float = 0.0
    used_memory: float = 0.0
    #: the copies started from an order without the deployment's demand, since the registry
    #: was last read for them (it is read once for each, by the ownership check)
    demand_unknown: set[str] = field(default_factory=set)

    def charge(self, copy: Copy, sign: float = 1.0) -> None:
        """Count a copy's demand in the node's usage (``sign`` -1: no longer)."""
        cpu, memory = copy.demand
        self.used_cpu = max(0.0, self.used_cpu + sign * cpu)
        self.used_memory = max(0.0, self.used_memory + sign * memory)

    def usage(self) -> tuple[float, float]:
        return self.used_cpu / self.cpus * 100.0, self.used_memory / self.memory * 100.0


class Worker(threading.Thread):
    """Handles the orders and timers of the nodes given to it, one at a time, in order."""

    def __init__(self, hollow: HollowFleet, index: int) -> None:
        super().__init__(name=f"dm-hollow-worker-{index}", daemon=True)
        self.hollow = hollow
        self.orders: queue.Queue[tuple[str, Node, Any]] = queue.Queue()
        self.timers: list[tuple[float, int, str, Node, Any]] = []
        self.seq = itertools.count()
        self.nodes: list[Node] = []
        self.next_check = time.monotonic() + FENCE_CHECK_INTERVAL
        self.next_registry_check = time.monotonic() + REGISTRY_CHECK_INTERVAL

    def later(self, delay: float, kind: str, node: Node, arg: Any) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.seq), kind, node, arg))

    def run(self) -> None:
        while not self.hollow.stopping.is_set():
            now = time.monotonic()
            wait = min(self.timers[0][0] - now if self.timers else 0.5, self.next_check - now)
            if any(len(n.outbox) for n in self.nodes):
                wait = min(wait, 0.05)
            try:
                kind, node, arg = self.orders.get(timeout=max(0.0, wait))
                self._safely(kind, node, arg)
            except queue.Empty:
                pass
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, kind, node, arg = heapq.heappop(self.timers)
                self._safely(kind, node, arg)
            for node in self.nodes:
                if node.alive and len(node.outbox):
                    node.outbox.flush()
            if now >= self.next_check:
                self.next_check = now + FENCE_CHECK_INTERVAL
                self._safely("check", None, None)

    def _safely(self, kind: str, node: Node | None, arg: Any) -> None:
        try:
            if kind == "check":
                full = time.monotonic() >= self.next_registry_check
                if full:
                    self.next_registry_check = time.monotonic() + REGISTRY_CHECK_INTERVAL
                self._check_ownership(full)
            elif node is not None and node.alive:
                getattr(self, "_" + kind)(node, arg)
        except Exception:  # one bad order must not stop the nodes of this thread
            log.exception("hollow %s order failed", kind)

    # -- orders ------------------------------------------------------------------

    def _run(self, node: Node, payload: dict[str, Any]) -> None:
        copy = Copy(payload, restarts=int(payload.get("restarts", 0)))
        self._start(node, copy)

    def _start(self, node: Node, copy: Copy) -> None:
        """As the supervisor's start, with the process start left out."""
        if self.hollow.lapsed():
            self.later(START_RETRY, "start", node, copy)
            return
        current = self._as_sent(node, copy) or self.hollow.ctl.registry.deployments.find_one({"_id": copy.dep_id})
        if current is None or current["generation"] != copy.generation or current["state"] != copy.expect:
            return  # the registry has moved on
        copy.pid = self.hollow.new_pid()
        copy.running = True
        node.copies[copy.dep_id] = copy
        if copy.payload.get("demand"):  # sent with the order: its usage from now on
            node.charge(copy)
        else:  # an order without it: learnt from the registry by the next ownership check
            node.demand_unknown.add(copy.dep_id)
        args = copy.payload.get("args") or {}
        if "hollow_exit_after" in args:
            self.later(float(args["hollow_exit_after"]), "exit", node, (copy, int(args.get("hollow_exit_code", 0))))
        pid = copy.pid

        def refused(doc: Doc | None) -> None:
            if doc is None and node.copies.get(copy.dep_id) is copy and copy.pid == pid:
                log.warning("node-%s: report for %s gen %s refused: killing it", node.id, copy.dep_id, copy.generation)
                self._drop(node, copy)

        restart = f" (restart {copy.restarts})" if copy.restarts else ""
        node.outbox.send(
            copy.dep_id, RUNNING, expect=[copy.expect], generation=copy.generation,
            reason=f"started on node-{node.id}{restart}", then=refused, current=current,
            pid=pid, restarts=copy.restarts,
        )  # fmt: skip

    def _as_sent(self, node: Node, copy: Copy) -> Doc | None:
        """The deployment as sent, when the order is fresh (see ``Supervisor._as_sent``)."""
        p = copy.payload
        if copy.expect != SCHEDULED or "rev" not in p or "sent_at" not in p or "request_id" not in p:
            return None
        if not 0 <= time.time() - float(p["sent_at"]) < self.hollow.ctl.settings.start_timeout / 3:
            return None
        return {
            "_id": copy.dep_id, "request_id": p["request_id"], "algorithm": p["algorithm"], "state": SCHEDULED,
            "node": node.id, "generation": copy.generation, "rev": int(p["rev"]), "exit_code": None,
        }  # fmt: skip

    def _kill(self, node: Node, arg: tuple[str, int, str]) -> None:
        dep_id, generation, reason = arg
        copy = node.copies.get(dep_id)
        if copy is not None and copy.generation != generation:
            return
        # a process stopped by SIGTERM reports -15; one already gone, nothing
        code = -signal.SIGTERM if copy is not None and copy.running else None
        if copy is not None:
            self._drop(node, copy)
        node.outbox.send(dep_id, STOPPED, expect=[STOPPING], generation=generation,
                         reason="stopped" if copy is not None else reason, exit_code=code)  # fmt: skip

    def _exit(self, node: Node, arg: tuple[Copy, int]) -> None:
        """The copy exits with ``code``: the supervisor's restart policy decides what follows."""
        copy, code = arg
        if node.copies.get(copy.dep_id) is not copy or not copy.running:
            return
        self._drop(node, copy)
        gen, dep_id = copy.generation, copy.dep_id
        policy = RestartPolicy.from_dict(copy.payload["restart"])
        what = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        if policy.should_restart(code, copy.restarts):
            delay = policy.delay(copy.restarts)
            copy.restarts += 1

            def restart(moved: Doc | None) -> None:
                if moved is not None and dep_id not in node.copies:
                    copy.expect = RESTARTING
                    copy.running = False
                    self.later(delay, "start", node, copy)

            node.outbox.send(
                dep_id, RESTARTING, expect=[RUNNING], generation=gen, then=restart, exit_code=code,
                reason=f"{what}, restart {copy.restarts}/{policy.max_restarts} in {delay:g}s",
                restarts=copy.restarts, pid=None,
            )  # fmt: skip
            return
        final = SUCCEEDED if code == 0 else FAILED
        reason = what
        if final == FAILED and policy.policy != "never" and copy.restarts >= policy.max_restarts:
            reason += f", gave up after {copy.restarts} restarts"
        node.outbox.send(dep_id, final, expect=[RUNNING], generation=gen, reason=reason, exit_code=code, pid=None)

    def _lapse(self, node: Node, reason: str) -> None:
        """The lease lapsed: kill every copy and report it ``lost`` (placed again)."""
        running = [cp for cp in node.copies.values() if cp.running]
        if running:
            log.warning("node-%s kills its %d copies: %s", node.id, len(running), reason)
        for copy in running:
            self._drop(node, copy)
            node.outbox.send(copy.dep_id, LOST, expect=list(ACTIVE_STATES), generation=copy.generation, pid=None,
                             reason=f"node-{node.id} could not renew its lease and killed its copy")  # fmt: skip

    def _rejoin(self, node: Node, _: Any) -> None:
        """Declared dead while alive: what it ran has moved on; it kills it all and rejoins empty."""
        for copy in list(node.copies.values()):
            self._drop(node, copy)
        self.hollow.ctl.registry.set_node_state(node.id, node_manager.UP)
        fleet.set_state(self.hollow.ctl.redis, node.id, node_manager.UP)
        log.warning("node-%s was declared dead; it killed its copies and rejoins empty", node.id)

    def _drop(self, node: Node, copy: Copy) -> None:
        if node.copies.get(copy.dep_id) is copy:
            del node.copies[copy.dep_id]
            if copy.dep_id not in node.demand_unknown:
                node.charge(copy, -1)
            node.demand_unknown.discard(copy.dep_id)
        copy.running = False

    def _check_ownership(self, full: bool = True) -> None:
        """Kill copies whose deployment moved to another generation or node; learn the demand of
        new ones. As the supervisor: unless ``full``, only copies the fleet no longer allocates on
        their node, or whose demand is unknown yet, are looked up in the registry."""
        ours = {cp.dep_id: (node, cp) for node in self.nodes if node.alive for cp in node.copies.values()}
        if not full and ours:
            nodes = [node for node in self.nodes if node.alive and node.copies]
            pipe = self.hollow.ctl.redis.pipeline(transaction=False)
            for node in nodes:
                pipe.hgetall(k.ALLOC.format(node.id))
            listed = {node.id: placed_here(allocs) for node, allocs in zip(nodes, pipe.execute(), strict=True)}
            ours = {
                d: (n, cp) for d, (n, cp) in ours.items()
                if listed.get(n.id, {}).get(d, -1) not in (cp.generation, None) or d in n.demand_unknown
            }  # fmt: skip
        if not ours:
            return
        fields = {"generation": 1, "node": 1, "state": 1, "demand": 1}
        docs = find_in(self.hollow.ctl.registry.deployments, ours, fields)
        current = {d["_id"]: d for d in docs}
        for dep_id, (node, copy) in ours.items():
            doc = current.get(dep_id)
            if doc is None or doc["generation"] != copy.generation or doc.get("node") != node.id:
                log.warning("%s gen %s is no longer on node-%s: killing it", dep_id, copy.generation, node.id)
                self._drop(node, copy)
            elif dep_id in node.demand_unknown:
                node.demand_unknown.discard(dep_id)
                copy.payload["demand"] = doc.get("demand") or {}
                node.charge(copy)


class HollowFleet:
    """N hollow nodes and the few threads they share."""

    def __init__(
        self, settings: Settings, *, cpus: float, memory: float, threads: int = 4, pid: int | None = None
    ) -> None:
        self.settings = settings
        #: the pid the nodes record (whoever stops nodes by pid stops this process); default this one
        self.pid = os.getpid() if pid is None else pid
        self.ctl = Control(settings)
        self.cpus = cpus
        self.memory = memory
        self.nodes: dict[str, Node] = {}
        self.stopping = threading.Event()
        self.workers = [Worker(self, i) for i in range(max(1, threads))]
        self.token = uuid.uuid4().hex
        self.interval = min(settings.metrics_interval, settings.lease_ttl / 3)
        self.last_renewed = time.monotonic()
        self.fenced = False
        self._pids = itertools.count(FAKE_PID_BASE + (os.getpid() % 1000) * 1_000_000)
        self.presence = _Presences(settings.redis_url)
        self.host = socket.gethostname()
        self.address = ""
        self.lock = threading.Lock()

    def new_pid(self) -> int:
        return next(self._pids)

    def lapsed(self) -> bool:
        return time.monotonic() - self.last_renewed > self.settings.lease_ttl * FENCE_FRACTION

    # -- start ---------------------------------------------------------------------

    def add(self, count: int) -> list[str]:
        """Register ``count`` new nodes (``starting``), give each its lease, presence and queue, then ``up``."""
        from workers.agent import own_address

        r, registry = self.ctl.redis, self.ctl.registry
        self.address = self.address or own_address(self.settings.redis_url)
        added = []
        for _ in range(count):
            node_id = str(r.incr(k.NODE_SEQ))
            fleet.register_node(r, node_id, cpus=self.cpus, memory=self.memory, state=node_manager.STARTING,
                                host=self.host, address=self.address)  # fmt: skip
            registry.upsert_node(
                node_id, state=node_manager.STARTING, host=self.host, address=self.address, cpus=self.cpus,
                memory=self.memory, pid=self.pid or None, provider="static", host_wide=False, hollow=True,
            )  # fmt: skip
            worker = len(self.nodes) % len(self.workers)
            node = Node(node_id, self.cpus, self.memory, Outbox(self.ctl, node_id), worker)
            self.workers[worker].nodes.append(node)
            added.append(node_id)
            with self.lock:
                self.nodes[node_id] = node
        self.renew([self.nodes[n] for n in added])
        for node_id in added:
            self.presence.open(node_id)
        for node_id in added:  # ready: its queue is consumed from now on
            fleet.set_state(r, node_id, node_manager.UP)
            registry.set_node_state(node_id, node_manager.UP)
        return added

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        threading.Thread(target=self._lease_loop, name="dm-hollow-leases", daemon=True).start()
        threading.Thread(target=self._consume, name="dm-hollow-queues", daemon=True).start()
        threading.Thread(target=self.presence.run, args=(self.stopping,), name="dm-hollow-presence",
                         daemon=True).start()  # fmt: skip

    # -- leases and samples ------------------------------------------------------------

    def renew(self, nodes: list[Node]) -> None:
        samples = [MetricsSample(n.id, *n.usage()) for n in nodes if n.alive]
        states = publish_all(self.ctl.redis, samples, self.settings.lease_ttl, self.token)
        self.last_renewed = time.monotonic()
        for node_id, state in states.items():
            node = self.nodes.get(node_id)
            if state == node_manager.DEAD and node is not None:
                self.workers[node.worker].orders.put(("rejoin", node, None))

    def _lease_loop(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                with self.lock:
                    nodes = list(self.nodes.values())
                self.renew(nodes)
                killed = self.ctl.redis.smembers(KILL_KEY)
                for node_id in killed & self.nodes.keys():  # type: ignore[operator]
                    self.kill(str(node_id))
                if self.fenced:
                    log.warning("hollow nodes reach Redis again")
                    self.fenced = False
            except Exception as exc:  # a store out of reach; this thread must outlive any error
                log.warning("hollow leases renewed %.1fs ago: %r", time.monotonic() - self.last_renewed, exc)
                if self.lapsed() and not self.fenced:
                    self.fenced = True
                    for node in list(self.nodes.values()):
                        self.workers[node.worker].orders.put(("lapse", node, "its lease was not renewed in time"))
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def kill(self, node_id: str) -> None:
        """As ``kill -9`` of one node: its presence connection closes, its lease and queue go
        unattended, and it reports nothing more."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            return
        node.alive = False
        self.presence.close(node_id)
        with self.lock:
            del self.nodes[node_id]
        log.warning("node-%s killed", node_id)

    # -- queues ------------------------------------------------------------------------

    def _consume(self) -> None:
        """Pop every node's queue over one connection and hand each order to its node's thread."""
        r = redis.Redis.from_url(self.settings.redis_url, socket_timeout=POP_TIMEOUT + 10, socket_connect_timeout=5)
        while not self.stopping.is_set():
            with self.lock:
                keys = [c.NODE_QUEUE_PREFIX + node_id for node_id in self.nodes]
            if not keys:
                self.stopping.wait(0.2)
                continue
            try:
                popped = r.brpop(keys, timeout=POP_TIMEOUT)
            except (redis.RedisError, OSError) as exc:
                log.warning("hollow queues: %s; trying again", exc)
                self.stopping.wait(0.5)
                continue
            if popped is None:
                continue
            key, raw = popped
            node_id = key.decode()[len(c.NODE_QUEUE_PREFIX) :]
            node = self.nodes.get(node_id)
            if node is None:  # killed meanwhile: a dead node takes nothing off its queue
                r.rpush(key, raw)
                continue
            try:
                task, args, kwargs = decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("node-%s: dropping a message it cannot read: %s", node_id, exc)
                continue
            worker = self.workers[node.worker]
            if task == "dm.run":
                worker.orders.put(("run", node, args[0] if args else kwargs["payload"]))
            elif task == "dm.kill":  # dm.kill(dep_id, generation, reason="stopped by request")
                call = {**dict(zip(("dep_id", "generation", "reason"), args, strict=False)), **kwargs}
                reason = str(call.get("reason") or "stopped by request")
                worker.orders.put(("kill", node, (str(call["dep_id"]), int(call["generation"]), reason)))
            else:
                log.error("node-%s: unknown task %r dropped", node_id, task)

    # -- stop ----------------------------------------------------------------------------

    def stop(self, handover: bool = True) -> None:
        """A clean stop: each node hands its deployments back, as a node agent does."""
        self.stopping.set()
        if handover:
            from workers.agent import handover as hand_over

            for node in list(self.nodes.values()):
                try:
                    hand_over(self.ctl, node.id, _NoSupervisor())  # type: ignore[arg-type]
                except Exception as exc:  # keep going: the other nodes must stop too
                    log.warning("node-%s: handover failed: %s", node.id, exc)
        self.presence.close_all()


class _NoSupervisor:
    """What :func:`workers.agent.handover` asks of a supervisor: nothing runs to kill."""

    def shutdown(self) -> list[dict[str, Any]]:
        return []


def decode(raw: bytes) -> tuple[str, list[Any], dict[str, Any]]:
    """(task name, args, kwargs) of a Celery task message (protocol 2, JSON) in kombu's Redis envelope."""
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, _embed = json.loads(body)
    return str(envelope["headers"]["task"]), list(args), dict(kwargs)


class _Presences:
    """Every node's presence connection, watched by one thread (a selector over the sockets).

    Each connection is named ``dm-node-<id>`` and blocks on ``dm:presence:<id>`` for
    :data:`PRESENCE_POLL` seconds at a time, then again: as :class:`workers.metrics.Presence`.
    """

    def __init__(self, url: str) -> None:
        pool = redis.ConnectionPool.from_url(url)
        self.connection_class = pool.connection_class
        self.kwargs = {**pool.connection_kwargs, "socket_timeout": PRESENCE_POLL * 2, "socket_connect_timeout": 5,
                       "socket_keepalive": True}  # fmt: skip
        self.conns: dict[str, Any] = {}
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.reconnect: set[str] = set()

    def open(self, node_id: str) -> None:
        conn = self.connection_class(**self.kwargs, client_name=fleet.presence_name(node_id))
        try:
            conn.connect()
            conn.send_command("BLPOP", k.presence(node_id), PRESENCE_POLL)
        except (redis.RedisError, OSError) as exc:
            log.warning("node-%s: presence connection failed (%s); trying again", node_id, exc)
            with self.lock:
                self.reconnect.add(node_id)
            return
        with self.lock:
            self.conns[node_id] = conn
            self.selector.register(conn._sock, selectors.EVENT_READ, node_id)  # type: ignore[attr-defined]

    def close(self, node_id: str) -> None:
        with self.lock:
            self.reconnect.discard(node_id)
            conn = self.conns.pop(node_id, None)
            if conn is not None:
                try:
                    self.selector.unregister(conn._sock)
                except (KeyError, ValueError):
                    pass
        if conn is not None:
            conn.disconnect()

    def close_all(self) -> None:
        for node_id in list(self.conns):
            self.close(node_id)

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            with self.lock:
                ready = self.selector.select(timeout=0) if self.conns else []
            if not ready:
                time.sleep(0.05)
            for key, _ in ready:
                node_id = key.data
                conn = self.conns.get(node_id)
                if conn is None:
                    continue
                try:
                    conn.read_response()
                    conn.send_command("BLPOP", k.presence(node_id), PRESENCE_POLL)
                except (redis.RedisError, OSError):
                    self.close(node_id)  # Redis went away: connect again at once, as a node does
                    with self.lock:
                        self.reconnect.add(node_id)
            with self.lock:
                retry = list(self.reconnect)
                self.reconnect.clear()
            for node_id in retry:
                self.open(node_id)
            if retry:
                time.sleep(0.2)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dm node --hollow", description="Run N hollow (simulated) nodes in one process.")
    p.add_argument("--hollow", type=int, required=True, metavar="N", help="how many nodes")
    p.add_argument("--cpus", type=float, default=16.0, help="declared capacity of each, in cores (default 16)")
    p.add_argument("--memory", type=float, default=65536.0, help="declared capacity of each, in MiB (default 65536)")
    p.add_argument("--threads", type=int, default=4, help="threads that handle the nodes' orders (default 4)")
    p.add_argument("--redis", help="Redis URL (default: DM_REDIS_URL)")
    p.add_argument("--mongo", help="MongoDB URL (default: DM_MONGO_URL)")
    p.add_argument("--loglevel", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s hollow %(levelname)s %(name)s: %(message)s")
    if args.hollow < 1:
        raise SystemExit("dm node --hollow: N must be at least 1")
    settings = Settings.from_env(redis_url=args.redis, mongo_url=args.mongo)
    settings.require_servers()
    # a socket per node: raise the open-files limit to what the system allows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.hollow + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    hollow = HollowFleet(settings, cpus=args.cpus, memory=args.memory, threads=args.threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    hollow.start()
    started = time.monotonic()
    ids = hollow.add(args.hollow)
    print(f"hollow: {len(ids)} nodes up ({ids[0]}..{ids[-1]}) in {time.monotonic() - started:.1f}s", flush=True)
    stop.wait()
    hollow.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
