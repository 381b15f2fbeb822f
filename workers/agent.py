"""The node agent, a node's "init": registers the node, publishes its metrics and lease,
supervises its algorithms, and runs a Celery worker on ``node.<id>`` (threads pool).

On SIGTERM it stops its algorithms and hands their deployments back to the control
plane at once (``lost`` -> placed again), rather than waiting for the lease to expire.

On another host, ``dm node --redis URL --mongo URL`` registers the node itself with the
address it reaches Redis from and its capacity (the whole host with ``--host-wide``).
It waits for Redis and MongoDB at start, and rides out their outages later: the lease
is renewed again as soon as Redis answers, reports are kept until MongoDB does, and
a node that was declared dead meanwhile kills what it ran and rejoins empty.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

from celery import signals
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from dm import constants as c
from dm import fleet, health, node_manager, worker_stats
from dm.app import app
from dm.backoff import Backoff
from dm.control import Control
from dm.lifecycle import Actor, set_node_state, transition
from dm.models import ACTIVE_STATES, LOST, STOPPED, STOPPING
from dm.redis_conn import configure_celery
from dm.settings import Settings
from workers import housekeeping, tasks, watchdog
from workers.metrics import HostSampler, Presence, Publisher, TreeSampler, host_capacity, lease_client
from workers.supervisor import Supervisor

log = logging.getLogger("dm.node")

T = TypeVar("T")
#: the longest wait between two attempts to reach Redis or MongoDB at start
START_BACKOFF_MAX = 10.0
#: a node's MongoDB calls give up after this long on a silent link (a partition), unless
#: the URL says otherwise: the supervisor must not hang on a socket that gets no answer
MONGO_SOCKET_TIMEOUT_MS = 10_000


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dm node", description="Run one dm node agent.")
    p.add_argument("--id", help="node id (default: a new one from the registry)")
    p.add_argument("--cpus", type=float, help="declared capacity in cores (default: the host's with --host-wide, "
                   "else DM_NODE_CPUS or 1)")  # fmt: skip
    p.add_argument("--memory", type=float, help="declared capacity in MiB (default: the host's with --host-wide, "
                   "else DM_NODE_MEMORY or 1024)")  # fmt: skip
    p.add_argument("--host-wide", action="store_true", help="this node owns its host: report host-wide usage")
    p.add_argument("--address", default="", help="address to report (default: the one this host reaches Redis from)")
    p.add_argument("--concurrency", type=int, default=4, help="task threads (default 4)")
    p.add_argument("--redis", help="Redis URL (default: DM_REDIS_URL)")
    p.add_argument("--mongo", help="MongoDB URL (default: DM_MONGO_URL)")
    p.add_argument("--loglevel", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s node %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(redis_url=args.redis, mongo_url=args.mongo)
    settings.require_servers()
    settings = settings.with_(mongo_url=bounded(settings.mongo_url))
    if args.redis or args.mongo:
        configure_celery(app.conf, settings.redis_url)
    ctl = Control(settings)
    r = ctl.redis
    node_id = args.id or _until_reachable("Redis", lambda: node_manager.next_node_id(ctl))
    # forked before any thread exists (pymongo starts some): it only reads a file and kills
    fence_file = watchdog.state_file(settings.home, node_id)
    watchdog.write_state(fence_file, time.time() + settings.lease_ttl, [])
    watchdog.start(fence_file)
    own_cpus, own_memory = host_capacity() if args.host_wide else (settings.node_cpus, settings.node_memory)
    cpus = args.cpus or own_cpus
    memory = args.memory or own_memory
    host = socket.gethostname()
    address = args.address or own_address(settings.redis_url)
    _until_reachable(
        "Redis",
        lambda: fleet.register_node(
            r, node_id, cpus=cpus, memory=memory, state=node_manager.STARTING, host=host, address=address
        ),
    )
    known = _until_reachable("MongoDB", lambda: ctl.registry.get_node(node_id))
    # started by hand unless a provider recorded itself when it started this node
    provider = (known or {}).get("provider") or "static"
    record = {"state": node_manager.STARTING, "host": host, "address": address, "cpus": cpus, "memory": memory,
              "pid": os.getpid(), "provider": provider, "host_wide": bool(args.host_wide)}  # fmt: skip
    _until_reachable("MongoDB", lambda: ctl.registry.upsert_node(node_id, **record))
    supervisor = Supervisor(ctl, node_id, fence_file)
    supervisor.start()
    housekeeping.start(supervisor, settings)  # log rotation, pruning past DM_RETENTION
    tasks.supervisor = supervisor
    sampler = HostSampler() if args.host_wide else TreeSampler(cpus, memory, groups=supervisor.groups)

    def rejoin() -> None:
        # declared dead while it could not renew (frozen, cut off): whatever it ran has moved on.
        # Redis last: until both stores say up, the next renewal sees "dead" and tries again
        # The control plane moved what it could; what asked to keep running cut off
        # (keep_for) and was not moved yet is still ours: the registry says which
        set_node_state(ctl.ports, node_id, node_manager.UP)
        ours = {d["_id"]: d["generation"] for d in ctl.ports.store.active_on(node_id) if d["state"] in ACTIVE_STATES}
        supervisor.fence_all("this node was declared dead", keep=ours)
        log.warning("node-%s was declared dead; it killed the algorithms moved elsewhere and rejoins with %d",
                    node_id, len(ours))  # fmt: skip

    def reregister() -> None:
        # Redis lost its data (a new, empty server): the node's hash is gone. The registry
        # says what this node is; its algorithms run on, and the reconcilers rebuild the rest
        doc = ctl.registry.get_node(node_id) or {}
        if doc.get("state") == node_manager.DEAD:
            rejoin()
            return
        state = doc.get("state") or node_manager.UP
        fleet.register_node(r, node_id, cpus=cpus, memory=memory, state=state, host=host, address=address)
        log.warning("node-%s registered again with Redis (its hash was gone), %s", node_id, state)

    publisher = Publisher(
        lease_client(settings.redis_url, settings.lease_ttl),
        node_id,
        sampler,
        interval=min(settings.metrics_interval, settings.lease_ttl / 3),
        lease_ttl=settings.lease_ttl,
        on_fence=supervisor.lapse,
        on_renew=supervisor.renewed,
        on_dead=rejoin,
        on_missing=reregister,
    )
    _until_reachable("Redis", publisher.publish_once)
    publisher.start()
    worker_stats.set_node_view(lambda: {**publisher.view(), **in_grace(ctl, node_id)})
    Presence(settings.redis_url, node_id).start()

    def ready(**_: Any) -> None:
        set_node_state(ctl.ports, node_id, node_manager.UP)
        log.warning("node-%s up: queue %s%s, %g cpu, %g MiB", node_id, c.NODE_QUEUE_PREFIX, node_id, cpus, memory)

    signals.worker_ready.connect(ready, weak=False)
    try:
        app.worker_main(
            [
                "worker",
                "-Q", c.NODE_QUEUE_PREFIX + node_id,
                "-P", "threads",
                "-c", str(args.concurrency),
                "-n", c.NODE_WORKER_NAME.format(node_id=node_id),
                "-E",
                "--without-gossip",
                "--without-mingle",
                "-l", args.loglevel,
            ]
        )  # fmt: skip
    finally:
        publisher.stop()
        handover(ctl, node_id, supervisor)
        # its algorithms are gone: the state on the tmpfs goes too (`dm down` signals the
        # whole process group, so the watchdog, killed with it, cannot remove it itself)
        watchdog.forget(fence_file)
    return 0


def in_grace(ctl: Control, node_id: str) -> dict[str, str]:
    """Whether the control plane holds its verdict on this node (its lease lapsed while it was blind)."""
    seen = health.control_store(ctl)
    if node_id in seen.get("nodes_in_grace", []):
        return {"dm node in grace": f"yes, for {seen['grace_until'] - time.time():.1f}s more"}
    return {"dm node in grace": "no"}


def handover(ctl: Control, node_id: str, supervisor: Supervisor) -> None:
    """A clean stop: kill the algorithms, mark their deployments ``lost`` and ask for a new placement."""
    set_node_state(ctl.ports, node_id, node_manager.STOPPING)
    supervisor.shutdown()
    ports = ctl.ports
    for doc in ports.store.active_on(node_id):
        if doc["state"] not in ACTIVE_STATES:  # stopping: killed with the others just now
            transition(ports, doc["_id"], STOPPED, actor=Actor.NODE, expect=[STOPPING], current=doc,
                       reason=f"stopped (node-{node_id} stopped)")  # fmt: skip
            continue
        lost = transition(
            ports, doc["_id"], LOST, actor=Actor.NODE, expect=ACTIVE_STATES, generation=doc["generation"],
            reason=f"node-{node_id} stopped", current=doc,
        )  # fmt: skip
        if lost is not None:
            ports.dispatcher.place_later(doc["_id"])
    set_node_state(ctl.ports, node_id, node_manager.STOPPED)
    fleet.remove_node(ctl.redis, node_id)
    log.warning("node-%s stopped", node_id)


def own_address(redis_url: str) -> str:
    """The address this host reaches Redis from (the one other hosts see), else its name's."""
    url = urlparse(redis_url)
    if url.hostname and url.scheme in ("redis", "rediss"):
        try:
            with socket.socket(socket.AF_INET6 if ":" in url.hostname else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((url.hostname, url.port or 6379))  # UDP: picks the route, sends nothing
                address = str(s.getsockname()[0])
            if not address.startswith("127.") and address != "::1":
                return address
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def bounded(mongo_url: str) -> str:
    """The MongoDB URL with a socket timeout, when it sets none."""
    if "sockettimeoutms" in mongo_url.lower():
        return mongo_url
    url = urlsplit(mongo_url)
    query = "&".join(q for q in (url.query, f"socketTimeoutMS={MONGO_SOCKET_TIMEOUT_MS}") if q)
    return urlunsplit((url.scheme, url.netloc, url.path or "/", query, url.fragment))


def _until_reachable(what: str, step: Callable[[], T]) -> T:
    """Run ``step`` until ``what`` answers, waiting longer after each failure."""
    backoff = Backoff(0.5, START_BACKOFF_MAX)
    while True:
        try:
            return step()
        except (RedisError, PyMongoError, OSError) as exc:
            delay = backoff.next()
            log.warning("cannot reach %s yet (%s); trying again in %.1fs", what, exc, delay)
            time.sleep(delay)
