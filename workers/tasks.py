"""Tasks a node agent runs from its own queue ``node.<id>``. Thin: verify, decode, hand to the supervisor.

Every order is checked against the control plane's signature (dm/signing.py) before
anything else: a forged one is refused with a log line, counted in :data:`refused`
and in the node's Redis hash (field ``refused_orders``), and starts or kills nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dm import keys as k
from dm import signing
from dm.app import app
from dm.errors import BadPackage, BadRequest, ConfigError
from dm.lifecycle import Actor, D, transition

log = logging.getLogger("dm.node")

#: set by the agent at start; tasks only run inside a node agent
supervisor: Any = None
#: orders this node refused for a missing or wrong signature, since it started
refused = 0
#: the field of the node's Redis hash (dm:node:<id>) that counts them, for dm metrics
REFUSED_FIELD = "refused_orders"
_refused_lock = threading.Lock()


def _supervisor() -> Any:
    if supervisor is None:
        raise ConfigError("dm.run and dm.kill run only on a node agent (`dm node`), not on a control worker")
    return supervisor


def _refuse(sup: Any, task: str, what: str) -> BadRequest:
    """Count and log a forged order; the error the task raises (Flower shows it failed)."""
    global refused
    with _refused_lock:
        refused += 1
    log.warning("node-%s refused a %s order with a missing or wrong signature (%s)", sup.node_id, task, what)
    try:
        sup.ctl.redis.hincrby(k.NODE.format(sup.node_id), REFUSED_FIELD, 1)
    except Exception as exc:  # the count in Redis is for metrics; the refusal stands without it
        log.warning("cannot count the refused order in Redis: %s", exc)
    return BadRequest(
        f"{task} refused by node-{sup.node_id}: its signature does not match this system's signing key "
        "(DM_SIGNING_KEY or DM_HOME/signing.key must be the same on the control plane and the nodes)"
    )


@app.task(name="dm.run", acks_late=False, ignore_result=True)  # the registry holds what became of it
def run(payload: dict[str, Any]) -> str:
    sup = _supervisor()
    if not signing.verify(payload, sup.ctl.settings):
        dep_id = payload.get("id") if isinstance(payload, dict) else None
        raise _refuse(sup, "dm.run", f"deployment {dep_id!r}")
    try:
        package = sup.ensure_package(payload["sha256"])  # fetched in this task thread, not the supervisor's
    except BadPackage as exc:
        transition(
            sup.ctl.ports,
            payload["id"],
            D.FAILED,
            actor=Actor.NODE,
            expect=[D.SCHEDULED],
            generation=payload["generation"],
            reason=f"cannot unpack the package on node-{sup.node_id}: {exc}",
        )
        raise
    except OSError as exc:  # a name too long for the file system, a full disk...: the restart policy decides
        from workers.containment.host import describe_start_error

        reason = f"cannot unpack the package on node-{sup.node_id}: {describe_start_error(exc)}"
        sup.start_deployment(payload, None, failure=reason)
        return str(payload["id"])
    sup.start_deployment(payload, package)
    return str(payload["id"])


@app.task(name="dm.kill", acks_late=False, ignore_result=True)
def kill(dep_id: str, generation: int, reason: str = "stopped by request", signature: str = "") -> str:
    sup = _supervisor()
    if not signing.verify_kill(dep_id, generation, reason, signature, sup.ctl.settings):
        raise _refuse(sup, "dm.kill", f"deployment {dep_id!r} generation {generation!r}")
    sup.kill_deployment(dep_id, generation, reason)
    return dep_id
