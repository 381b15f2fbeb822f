"""The dispatcher port on Celery: run and kill orders to a node's queue ``node.<id>``,
placements to ``dm.control``.

A run order goes out in the same Redis round trip that records the allocation and
releases the placement lock, when the broker is that Redis (see :mod:`dm.sender`).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from dm import constants as c
from dm import fleet, redis_conn, signing
from dm.models import Demand
from dm.ports import Lock
from dm.sender import Order, TaskSender
from dm.settings import Settings

Doc = dict[str, Any]


def run_payload(doc: Doc) -> dict[str, Any]:
    """What a node needs to run a deployment (JSON)."""
    return {
        "id": doc["_id"],
        "request_id": doc["request_id"],
        "generation": doc["generation"],
        # the deployment's rev as sent, and when: a fresh order starts without reading it again
        "rev": doc["rev"],
        "sent_at": time.time(),
        "algorithm": doc["algorithm"],
        "version": doc["version"],
        "sha256": doc["sha256"],
        "command": doc["command"],
        "env": doc.get("env") or {},
        "args": doc.get("args") or {},
        "restart": doc["restart"],
        "restarts": doc.get("restarts", 0),
        "keep_for": doc.get("keep_for") or 0.0,
        # what placement reserved for it on the node (cpus, MiB)
        "demand": doc.get("demand") or {},
    }


def run_order(doc: Doc) -> Order:
    # argsrepr: what Flower shows for the task: the algorithm, the deployment and its generation
    argsrepr = f"{doc['algorithm']} deployment={doc['_id']} generation={doc['generation']}"
    return ("dm.run", c.NODE_QUEUE_PREFIX + doc["node"], [run_payload(doc)], {}, argsrepr)


_sender: TaskSender | None = None


def sender() -> TaskSender:
    from dm.app import app

    global _sender
    if _sender is None or _sender.url != str(app.conf.broker_url or ""):
        _sender = TaskSender(app)
    return _sender


class CeleryDispatcher:
    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.redis_url = settings.redis_url

    def run(self, doc: Doc, demand: Demand | None, lock: Lock | None) -> None:
        from dm.app import app

        pipe = self.r.pipeline(transaction=False)
        if demand is not None:
            fleet.allocate(self.r, doc["node"], doc["_id"], demand, pipe=pipe, generation=doc["generation"])
        if lock is not None:
            lock.release(pipe)
        same = app.conf.broker_url == redis_conn.broker_url(self.redis_url)  # this Redis is the broker
        queued = same and sender().push(pipe, [run_order(doc)])
        pipe.execute()
        if not queued:
            sender().send([run_order(doc)])

    def run_many(self, docs: list[Doc], lock: Lock | None) -> None:
        from dm.app import app

        pipe = self.r.pipeline(transaction=False)
        if lock is not None:
            lock.release(pipe)
        orders = [run_order(doc) for doc in docs]
        same = app.conf.broker_url == redis_conn.broker_url(self.redis_url)
        queued = bool(orders) and same and sender().push(pipe, orders)
        pipe.execute()
        if orders and not queued:
            sender().send(orders)

    def kill(self, doc: Doc, reason: str) -> None:
        from dm.app import app

        queue = c.NODE_QUEUE_PREFIX + str(doc["node"])
        kill = signing.kill_args(doc["_id"], doc["generation"], reason, self.settings)  # signed: dm/signing.py
        app.send_task("dm.kill", args=kill, queue=queue)

    def place_later(self, dep_id: str) -> None:
        from dm.app import app

        app.send_task("dm.place", args=[dep_id], queue=c.CONTROL_QUEUE)
