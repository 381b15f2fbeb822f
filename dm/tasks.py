"""Control-plane tasks on ``dm.control``. Thin: decode, call a plain function, retry on outages."""

from __future__ import annotations

from typing import Any

from celery import signals

from dm import constants as c
from dm import deployer, heartbeat, relay
from dm.app import app
from dm.control import get_control
from dm.models import DeployRequest
from dm.outage import TRANSIENT  # outages a task waits out with a retry; a permanent error fails it

__all__ = ["TRANSIENT", "deploy", "heartbeat_check", "place", "stop"]


@app.task(
    bind=True,
    name="dm.deploy",
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=None,  # an outage of the stores is waited out: the request is not dropped
)
def deploy(
    self: Any,
    algorithm: str,
    args: dict[str, Any] | None = None,
    request_id: str | None = None,
    version: str | None = None,
    deployment_id: str | None = None,
) -> dict[str, Any]:
    """Deploy an algorithm; returns the deployment (id, node, state, ...).

    ``deployment_id`` is for callers that recorded the deployment already (the Kafka bridge).
    """
    ctl = get_control()
    if deployment_id is not None:
        return deployer.public(deployer.place(ctl, deployment_id))
    # the task id stands in for a missing request id, so a redelivered message makes no second deployment
    request = DeployRequest.from_dict(
        {"algorithm": algorithm, "args": args or {}, "request_id": request_id or self.request.id, "version": version}
    )
    return deployer.public(deployer.deploy(ctl, request))


@app.task(name="dm.place", autoretry_for=TRANSIENT, retry_backoff=True, max_retries=10)
def place(deployment_id: str) -> dict[str, Any]:
    return deployer.public(deployer.place(get_control(), deployment_id))


@app.task(name="dm.stop", autoretry_for=TRANSIENT, retry_backoff=True, max_retries=10)
def stop(deployment_id: str, reason: str = "stopped by request") -> dict[str, Any]:
    return deployer.public(deployer.stop(get_control(), deployment_id, reason))


@app.task(name="dm.heartbeat", acks_late=False, ignore_result=True)
def heartbeat_check() -> dict[str, Any]:
    return heartbeat.check(get_control())


@signals.worker_ready.connect
def _start_relay(sender: Any = None, **_: Any) -> None:
    """A control worker (one that consumes ``dm.control``) runs a relay (dm.relay)."""
    queues = {q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", [])}
    if c.CONTROL_QUEUE in queues:
        relay.start(get_control())


@signals.worker_shutdown.connect
def _stop_relay(**_: Any) -> None:
    relay.stop()
