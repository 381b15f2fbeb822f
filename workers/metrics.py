"""A node's usage in percent of its capacity, and the thread that publishes it with the lease.

A local node (one of several on a machine) measures itself against its declared capacity:
the memory of the agent and its algorithms, the cpu of its algorithms (the agent's own cpu
is about 0.5% at idle but a whole core while it starts or unpacks a package: counting it
made a node that had just started look full, and placement start another). Its algorithms'
share is the sum of their groups (their cgroups: a process that left the agent's tree with
``setsid`` still counts), or without groups the agent's process tree. A node that owns its
host measures the host.

The lease is renewed over a connection of its own with short timeouts and no retries
inside redis-py: while Redis is out of reach the publisher notices within a third of
the TTL, keeps trying once per interval (a renewal must land as soon as Redis is back),
and asks the supervisor to kill the algorithms once it has been silent for the fence time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dm import fleet, keys, redis_conn
from dm.models import MetricsSample
from workers.containment.base import Group
from workers.containment.fallback import descendants
from workers.containment.usage import MIB, Meter, Use
from workers.watchdog import FENCE_FRACTION

log = logging.getLogger(__name__)


class TreeSampler:
    """cpu of this node's algorithms and ram of the agent and them, in percent of a declared capacity.

    ``groups`` gives each running deployment's group (the supervisor's ``groups``): the
    algorithms are then the sum of their groups; without it, this process's descendants.
    """

    def __init__(self, cpus: float, memory_mib: float, groups: Callable[[], dict[str, Group]] | None = None) -> None:
        self.cpus = cpus
        self.memory = memory_mib
        self.root = psutil.Process(os.getpid())
        self._procs: dict[int, psutil.Process] = {}
        self.meter = Meter(groups) if groups is not None else None
        #: each deployment's use at the last sample (with groups)
        self.usage: dict[str, Use] = {}

    def sample(self) -> tuple[float, float]:
        if self.meter is not None:
            self.usage = self.meter.read()
            cores = sum(u.cpu for u in self.usage.values())
            mib = self.root.memory_info().rss / MIB + sum(u.memory for u in self.usage.values())
            return cores * 100.0 / self.cpus, mib / self.memory * 100.0
        current = [self.root]
        for pid in descendants(self.root.pid):
            known = self._procs.get(pid)
            try:
                current.append(known if known is not None else psutil.Process(pid))
            except psutil.Error:
                continue
        cpu = rss = 0.0
        seen: dict[int, psutil.Process] = {}
        for proc in current:
            # keep the Process objects: cpu_percent measures since the previous call on the same object
            proc = self._procs.get(proc.pid, proc)
            try:
                busy = proc.cpu_percent(None)
                cpu += busy if proc.pid != self.root.pid else 0.0
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
            seen[proc.pid] = proc
        self._procs = seen
        return cpu / self.cpus, rss / (1024 * 1024) / self.memory * 100.0


class HostSampler:
    """Host-wide figures, for a node that owns its host."""

    def __init__(self) -> None:
        psutil.cpu_percent(None)

    def sample(self) -> tuple[float, float]:
        return psutil.cpu_percent(None), psutil.virtual_memory().percent


def lease_client(url: str, lease_ttl: float) -> redis.Redis:
    """A Redis client for lease renewals: it fails fast, so the caller decides when to retry."""
    timeout = max(0.2, lease_ttl / 3)
    return redis_conn.client(
        url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )  # fmt: skip


def host_capacity() -> tuple[float, float]:
    """This host's cores and memory (MiB), for a node that owns its host."""
    return float(psutil.cpu_count() or 1), psutil.virtual_memory().total / (1024 * 1024)


class Publisher(threading.Thread):
    """Publishes a sample and renews the lease every ``interval``; calls ``on_fence`` when the
    lease could not be renewed for a whole TTL (the node must assume it has been replaced)."""

    def __init__(
        self,
        r: redis.Redis,
        node_id: str,
        sampler: TreeSampler | HostSampler,
        *,
        interval: float,
        lease_ttl: float,
        on_fence: Callable[[str], None],
        on_renew: Callable[[float], None] | None = None,
        on_dead: Callable[[], None] | None = None,
        on_missing: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"dm-metrics-{node_id}", daemon=True)
        self.r = r
        self.node_id = node_id
        self.sampler = sampler
        self.interval = interval
        self.lease_ttl = lease_ttl
        self.on_fence = on_fence
        self.on_renew = on_renew
        self.on_dead = on_dead
        #: called when the node's hash has no state: Redis lost its data and the node must register again
        self.on_missing = on_missing
        self.token = uuid.uuid4().hex
        self.last_renewed = time.monotonic()
        self.fenced = False
        #: when renewals started failing (wall clock), and the last outage seen: (at, seconds, error)
        self.failing_since: float | None = None
        self.last_outage: tuple[float, float, str] | None = None
        self.stopping = threading.Event()

    @property
    def fence_after(self) -> float:
        """Seconds without a renewal after which this node must kill its algorithms."""
        return self.lease_ttl * FENCE_FRACTION

    def publish_once(self) -> None:
        cpu, ram = self.sampler.sample()
        sent = time.time()
        state = fleet.publish(self.r, MetricsSample(self.node_id, cpu, ram), self.lease_ttl, self.token)
        self.last_renewed = time.monotonic()
        if self.on_renew is not None:
            # counted from before the request: the lease may have been set at any time since
            self.on_renew(sent + self.fence_after)
        if state == "dead" and self.on_dead is not None:
            self.on_dead()
        elif state is None and self.on_missing is not None:
            self.on_missing()

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.publish_once()
                if self.failing_since is not None:
                    self.last_outage = (self.failing_since, time.time() - self.failing_since, self.last_outage_error)
                    self.failing_since = None
                if self.fenced:
                    log.warning("node-%s reaches Redis again", self.node_id)
                    self.fenced = False
            except Exception as exc:  # a store out of reach; this thread must outlive any error
                if self.failing_since is None:
                    self.failing_since, self.last_outage_error = time.time(), f"{type(exc).__name__}: {exc}"
                silent = time.monotonic() - self.last_renewed
                log.warning("node-%s: lease renewed %.1fs ago: %r", self.node_id, silent, exc)
                if silent >= self.fence_after and not self.fenced:
                    self.fenced = True
                    self.on_fence(f"lease not renewed for {silent:.1f}s")
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self.stopping.set()

    last_outage_error = ""

    def view(self) -> dict[str, str]:
        """This node's side of the control store's health, as rows of its worker's stats (Flower)."""
        silent = time.monotonic() - self.last_renewed
        if self.failing_since is None:
            lease = f"renewed {silent:.1f}s ago; this node fences after {self.fence_after:.1f}s without a renewal"
        else:
            lease = (f"not renewed for {silent:.1f}s ({self.last_outage_error}); "
                     + ("fenced: it killed what may run elsewhere" if self.fenced
                        else f"fences in {max(0.0, self.fence_after - silent):.1f}s"))  # fmt: skip
        rows = {"dm node lease": lease}
        if self.last_outage is not None:
            at, seconds, error = self.last_outage
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
            rows["dm node last outage"] = f"{when}, lease not renewed for {seconds:.1f}s ({error})"
        else:
            rows["dm node last outage"] = "none since this node started"
        return rows


class Presence(threading.Thread):
    """Holds one named, blocked connection to Redis for the node's whole life.

    When the agent dies its socket closes at once and the name leaves ``CLIENT LIST``:
    the heartbeat manager takes that as a faster signal than the lease expiring.
    """

    #: seconds each blocked call lasts: a connection the server forgot (a restart during a
    #: partition) is found out on the next call, not never
    POLL = 5

    def __init__(self, url: str, node_id: str) -> None:
        super().__init__(name=f"dm-presence-{node_id}", daemon=True)
        self.client = redis_conn.client(
            url, client_name=fleet.presence_name(node_id), socket_keepalive=True, socket_timeout=self.POLL * 2,
            socket_connect_timeout=2, retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        self.key = keys.presence(node_id)

    def run(self) -> None:
        while True:
            try:
                self.client.blpop([self.key], timeout=self.POLL)
            except (redis.RedisError, OSError):
                time.sleep(0.2)  # reconnect at once when Redis is back: the heartbeat looks for this name
