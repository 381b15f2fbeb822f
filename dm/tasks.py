"""Control-plane tasks on ``dm.control``. Thin: decode, call a plain function, retry on outages."""

from __future__ import annotations

from typing import Any

from celery import signals

from dm import constants as c
from dm import deployer, reconcilers, relay, retention
from dm.app import app
from dm.control import get_control
from dm.models import DeployRequest
from dm.outage import TRANSIENT  # outages a task waits out with a retry; a permanent error fails it

__all__ = ["TRANSIENT", "allocations", "deploy", "detect", "place", "replace", "retention_sweep", "scale", "stop"]


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
    keep_for: float | str | None = None,
) -> dict[str, Any]:
    """Deploy an algorithm; returns the deployment (id, node, state, ...).

    ``deployment_id`` is for callers that recorded the deployment already (the Kafka bridge).
    """
    ports = get_control().ports
    if deployment_id is not None:
        return deployer.public(deployer.place_or_grow(ports, ports.store.get(deployment_id)))
    # the task id stands in for a missing request id, so a redelivered message makes no second deployment
    request = DeployRequest.from_dict(
        {
            "algorithm": algorithm,
            "args": args or {},
            "request_id": request_id or self.request.id,
            "version": version,
            "keep_for": keep_for,
        }
    )
    return deployer.public(deployer.deploy(ports, request))


@app.task(name="dm.place", autoretry_for=TRANSIENT, retry_backoff=True, max_retries=10)
def place(deployment_id: str) -> dict[str, Any]:
    ports = get_control().ports
    return deployer.public(deployer.place_or_grow(ports, ports.store.get(deployment_id)))


@app.task(name="dm.stop", autoretry_for=TRANSIENT, retry_backoff=True, max_retries=10)
def stop(deployment_id: str, reason: str = "stopped by request") -> dict[str, Any]:
    return deployer.public(deployer.stop(get_control().ports, deployment_id, reason))


# The reconcilers (dm.reconcilers), each its own task on beat's schedule: a slow one (a pass
# that places many deployments) never delays the failure detector.
@app.task(name="dm.detect", acks_late=False, ignore_result=True)
def detect() -> dict[str, Any]:
    return reconcilers.detect.run(get_control().ports)


@app.task(name="dm.replace", acks_late=False, ignore_result=True)
def replace() -> dict[str, Any]:
    return reconcilers.replace.run(get_control().ports)


@app.task(name="dm.scale", acks_late=False, ignore_result=True)
def scale() -> dict[str, Any]:
    return reconcilers.scale.run(get_control().ports)


@app.task(name="dm.allocations", acks_late=False, ignore_result=True)
def allocations() -> dict[str, Any]:
    return reconcilers.allocations.run(get_control().ports)


@app.task(name="dm.retention", acks_late=False, ignore_result=True)
def retention_sweep() -> dict[str, Any]:
    """Forget finished deployments, their events and gone nodes past DM_RETENTION (dm/retention.py)."""
    return retention.sweep(get_control())


@signals.worker_ready.connect
def _start_relay(sender: Any = None, **_: Any) -> None:
    """A control worker (one that consumes ``dm.control``) runs a relay (dm.relay)."""
    queues = {q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", [])}
    if c.CONTROL_QUEUE in queues:
        relay.start(get_control())


@signals.worker_shutdown.connect
def _stop_relay(**_: Any) -> None:
    relay.stop()
