"""Celery task messages built from a template and pushed with one ``LPUSH``.

Celery's ``send_task`` costs about a millisecond of Python per message (routing,
``saferepr``, kombu's publish path, a task-sent event): as much as the registry write
of a placement. When the broker is Redis, dm builds the messages itself from a
template that Celery's own ``as_task_v2`` made once per task (task protocol 2, JSON),
in the envelope of kombu's Redis transport: the worker gets what ``send_task(name,
args, kwargs, queue=..., ignore_result=True)`` sends (a test holds the two side by
side), minus the task-sent event (Flower shows the task once a worker receives it).
Any other broker gets ``send_task``. Either way a ``dm.run`` goes out signed (dm/signing.py).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from dm import signing

#: a task to send: (task name, queue, args, kwargs, argsrepr or None)
Order = tuple[str, str, Sequence[Any], dict[str, Any], str | None]


class TaskSender:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self.url = url = str(app.conf.broker_url or "")
        #: the broker is a Redis (possibly found through Sentinels): messages can ride a pipeline of it
        self.is_redis = url.startswith(("redis://", "rediss://", "unix://", "sentinel://"))
        direct = self.is_redis and not url.startswith("sentinel://")
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5) if direct else None
        self.prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
        self._templates: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}

    def _template(self, task: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        made = self._templates.get(task)
        if made is None:
            m = self.app.amqp.as_task_v2("", task, (), {}, ignore_result=True, reply_to=self.app.thread_oid)
            properties = {**m.properties, "delivery_mode": 2, "priority": 0, "body_encoding": "base64"}
            made = self._templates[task] = (dict(m.headers), properties, m.body[2])
        return made

    def key(self, queue: str) -> str:
        """The Redis list of a queue (priority 0)."""
        return f"{self.prefix}{queue}"

    def message(self, order: Order, task_id: str | None = None) -> bytes:
        """One task message, as kombu's Redis transport would write it."""
        task, queue, args, kwargs, argsrepr = order
        args = signing.sign_order_args(task, list(args))
        headers, properties, embed = self._template(task)
        task_id = task_id or str(uuid.uuid4())
        body = json.dumps([list(args), kwargs, embed]).encode()
        headers = {
            **headers,
            "id": task_id,
            "root_id": task_id,
            "argsrepr": argsrepr if argsrepr is not None else repr(tuple(args)),
            "kwargsrepr": repr(kwargs),
        }
        properties = {  # a shallow copy: the one nested value, delivery_info, is replaced
            **properties,
            "correlation_id": task_id,
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
        }
        envelope = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
        return json.dumps(envelope).encode()

    def push(self, pipe: Any, orders: Sequence[Order]) -> bool:
        """Add the LPUSHes of ``orders`` to a Redis pipeline of the broker; False (nothing
        added) when the broker is not Redis: then call :meth:`send`."""
        if not self.is_redis:
            return False
        for order in orders:
            pipe.lpush(self.key(order[1]), self.message(order))
        return True

    def send(self, orders: Sequence[Order]) -> None:
        """Send the tasks, in order (one round trip on Redis)."""
        if not orders:
            return
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            self.push(pipe, orders)
            pipe.execute()
            return
        with self.app.producer_or_acquire() as producer:
            for task, queue, args, kwargs, argsrepr in orders:
                signed = signing.sign_order_args(task, list(args))
                self.app.send_task(
                    task, args=signed, kwargs=kwargs, queue=queue, producer=producer, ignore_result=True,
                    argsrepr=argsrepr,
                )  # fmt: skip
