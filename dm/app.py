"""The Celery app. ``celery -A dm worker -Q dm.control`` runs the control plane."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.app.amqp import AMQP
from kombu import Connection

from dm import constants as c
from dm.errors import ConfigError
from dm.redis_conn import configure_celery
from dm.settings import Settings
from dm.worker_stats import ControlStoreStats

settings = Settings.from_env()


class DMTask(Task):  # type: ignore[misc]
    """Refuses to send to an unconfigured broker with a message that says what to do."""

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        if not self.app.conf.broker_url:
            raise ConfigError(
                "dm has no broker: run `dm up` first (it records its URLs under DM_HOME), "
                "or set DM_REDIS_URL and DM_MONGO_URL"
            )
        return super().apply_async(*args, **kwargs)


#: seconds between a worker's tries to reach the broker again: the first, the step, the most.
#: Kombu's defaults (2, 2, 30) leave a worker idle up to 4 s after a Sentinel promotion,
#: and longer after a longer outage; these cost a log line a few seconds while it lasts
RECONNECT_START, RECONNECT_STEP, RECONNECT_MAX = 0.5, 0.5, 5.0


class _Connection(Connection):  # type: ignore[misc]
    """Kombu's connection, tried again sooner when the broker comes back."""

    def ensure_connection(
        self,
        errback: Any = None,
        max_retries: int | None = None,
        interval_start: float = RECONNECT_START,
        interval_step: float = RECONNECT_STEP,
        interval_max: float = RECONNECT_MAX,
        **kwargs: Any,
    ) -> Any:
        return super().ensure_connection(errback, max_retries, interval_start, interval_step, interval_max, **kwargs)


class _AMQP(AMQP):  # type: ignore[misc]
    Connection = _Connection


app = Celery("dm", task_cls=DMTask, amqp=_AMQP, include=["dm.tasks", "workers.tasks"])
# every dm worker's stats (and so Flower's page of it) say how the control store is doing
app.steps["worker"].add(ControlStoreStats)
try:
    app.config_from_object("celeryconfig")
except ImportError:  # installed without the checkout: the same defaults
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_default_queue=c.CONTROL_QUEUE,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 120, "socket_connect_timeout": 5, "socket_keepalive": True},
        result_backend_transport_options={"retry_policy": dict(c.RESULT_RETRY_POLICY)},
        result_backend_always_retry=True,
        result_backend_max_retries=40,
        result_backend_base_sleep_between_retries_ms=50,
        result_backend_max_sleep_between_retries_ms=500,
        redis_socket_connect_timeout=5,
    )
# the broker and the result backend on DM_REDIS_URL: Sentinels and TLS translated for Celery
configure_celery(app.conf, settings.redis_url)
app.conf.task_default_queue = c.CONTROL_QUEUE


def _every(task: str, seconds: float) -> dict[str, Any]:
    # expires: a pass that waited in the queue past a few periods is skipped, not run late
    return {"task": task, "schedule": seconds, "options": {"queue": c.CONTROL_QUEUE, "expires": max(seconds * 4, 2.0)}}


app.conf.beat_schedule = {
    "dm-detect": _every("dm.detect", settings.heartbeat_interval),
    "dm-replace": _every("dm.replace", settings.heartbeat_interval),
    "dm-scale": _every("dm.scale", max(settings.heartbeat_interval * 4, 2.0)),
    "dm-allocations": _every("dm.allocations", 15.0),
    "dm-retention": _every("dm.retention", settings.retention_interval),
}
