"""Tasks a node agent runs from its own queue ``node.<id>``. Thin: decode, hand to the supervisor."""

from __future__ import annotations

from typing import Any

from dm import deployer
from dm.app import app
from dm.errors import BadPackage, ConfigError
from dm.models import FAILED, SCHEDULED

#: set by the agent at start; tasks only run inside a node agent
supervisor: Any = None


def _supervisor() -> Any:
    if supervisor is None:
        raise ConfigError("dm.run and dm.kill run only on a node agent (`dm node`), not on a control worker")
    return supervisor


@app.task(name="dm.run", acks_late=False, ignore_result=True)  # the registry holds what became of it
def run(payload: dict[str, Any]) -> str:
    sup = _supervisor()
    try:
        package = sup.ensure_package(payload["sha256"])  # fetched in this task thread, not the supervisor's
    except BadPackage as exc:
        deployer.transition(
            sup.ctl,
            payload["id"],
            FAILED,
            expect=[SCHEDULED],
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
def kill(dep_id: str, generation: int, reason: str = "stopped by request") -> str:
    _supervisor().kill_deployment(dep_id, generation, reason)
    return dep_id
