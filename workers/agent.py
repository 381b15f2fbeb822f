"""The node agent, a node's "init": registers the node, publishes its metrics and lease,
supervises its algorithms, and runs a Celery worker on ``node.<id>`` (threads pool).

On SIGTERM it stops its algorithms and hands their deployments back to the control
plane at once (``lost`` -> placed again), rather than waiting for the lease to expire.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from typing import Any

from celery import signals

from dm import constants as c
from dm import fleet, node_manager
from dm.app import app
from dm.control import Control
from dm.models import ACTIVE_STATES, LOST
from dm.settings import Settings
from workers import tasks, watchdog
from workers.metrics import HostSampler, Presence, Publisher, TreeSampler
from workers.supervisor import Supervisor

log = logging.getLogger("dm.node")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dm node", description="Run one dm node agent.")
    p.add_argument("--id", help="node id (default: a new one from the registry)")
    p.add_argument("--cpus", type=float, help="declared capacity in cores (default: DM_NODE_CPUS or 1)")
    p.add_argument("--memory", type=float, help="declared capacity in MiB (default: DM_NODE_MEMORY or 1024)")
    p.add_argument("--host-wide", action="store_true", help="this node owns its host: report host-wide usage")
    p.add_argument("--address", default="", help="address to report (default: this host's)")
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
    if args.redis or args.mongo:
        app.conf.broker_url = app.conf.result_backend = settings.redis_url
    ctl = Control(settings)
    r = ctl.redis
    node_id = args.id or str(r.incr(node_manager.NODE_SEQ_KEY))
    # forked before any thread exists (pymongo starts some): it only reads a file and kills
    fence_file = settings.home / "nodes" / f"node-{node_id}.fence"
    fence_file.parent.mkdir(parents=True, exist_ok=True)
    watchdog.write_state(fence_file, time.time() + settings.lease_ttl, [])
    watchdog.start(fence_file)
    cpus = args.cpus or settings.node_cpus
    memory = args.memory or settings.node_memory
    host = socket.gethostname()
    address = args.address or _address()
    fleet.register_node(r, node_id, cpus=cpus, memory=memory, state=node_manager.STARTING, host=host, address=address)
    ctl.registry.upsert_node(
        node_id,
        state=node_manager.STARTING,
        host=host,
        address=address,
        cpus=cpus,
        memory=memory,
        pid=os.getpid(),
    )
    supervisor = Supervisor(ctl, node_id)
    supervisor.start()
    tasks.supervisor = supervisor
    sampler = HostSampler() if args.host_wide else TreeSampler(cpus, memory)

    def rejoin() -> None:
        # declared dead while it could not renew (frozen, cut off): whatever it ran has moved on
        supervisor.fence_all("this node was declared dead")
        fleet.set_state(r, node_id, node_manager.UP)
        ctl.registry.set_node_state(node_id, node_manager.UP)
        log.warning("node-%s was declared dead; it killed its algorithms and rejoins empty", node_id)

    publisher = Publisher(
        r,
        node_id,
        sampler,
        interval=min(settings.metrics_interval, settings.lease_ttl / 3),
        lease_ttl=settings.lease_ttl,
        on_fence=supervisor.fence_all,
        on_renew=supervisor.renewed,
        on_dead=rejoin,
    )
    publisher.publish_once()
    publisher.start()
    Presence(settings.redis_url, node_id).start()

    def ready(**_: Any) -> None:
        fleet.set_state(r, node_id, node_manager.UP)
        ctl.registry.set_node_state(node_id, node_manager.UP)
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
    return 0


def handover(ctl: Control, node_id: str, supervisor: Supervisor) -> None:
    """A clean stop: kill the algorithms, mark their deployments ``lost`` and ask for a new placement."""
    fleet.set_state(ctl.redis, node_id, node_manager.STOPPING)
    supervisor.shutdown()
    for doc in ctl.registry.active_on(node_id):
        lost = ctl.registry.transition(
            doc["_id"],
            LOST,
            expect=ACTIVE_STATES,
            generation=doc["generation"],
            reason=f"node-{node_id} stopped",
        )
        if lost is not None:
            fleet.release(ctl.redis, node_id, doc["_id"])
            app.send_task("dm.place", args=[doc["_id"]], queue=c.CONTROL_QUEUE)
    ctl.registry.set_node_state(node_id, node_manager.STOPPED)
    fleet.remove_node(ctl.redis, node_id)
    log.warning("node-%s stopped", node_id)


def _address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
