"""The supervisor's policy core: what an exit (or a failed start) of an algorithm's process
means for its deployment. Pure: the supervisor reports the outcome through its outbox.

- killed by a stop order -> ``stopped`` (expected ``stopping``);
- killed because the node's lease lapsed -> ``lost`` (placed again, here or elsewhere);
- killed as a fence or at shutdown -> no report (the registry has moved on, or the agent
  hands the deployment back itself);
- otherwise the restart policy: ``restarting`` after a backoff, or ``succeeded``/``failed``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dm.lifecycle import ACTIVE, D
from dm.models import RestartPolicy


@dataclass(frozen=True)
class Outcome:
    state: D
    expect: tuple[D, ...]
    reason: str
    exit_code: int | None = None
    #: seconds before the restart (``restarting`` only)
    delay: float = 0.0
    #: the restart count after this outcome
    restarts: int = 0


def describe(code: int | None) -> str:
    if code is None:
        return "exited"
    return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"


def on_exit(
    policy: RestartPolicy, code: int | None, restarts: int, killed_for: str | None = None, why: str = ""
) -> Outcome | None:
    """The outcome of a process exit. ``killed_for``: why the supervisor killed it, if it did
    (``stop``, ``lapse``, ``fence``, ``shutdown``); ``why``: a cause the supervisor knows
    better than the exit code (``out of memory (limit 80 MiB)``)."""
    if killed_for == "stop":
        return Outcome(D.STOPPED, (D.STOPPING,), "stopped", code, restarts=restarts)
    if killed_for == "lapse":
        return Outcome(D.LOST, ACTIVE, "", code, restarts=restarts)
    if killed_for is not None:
        return None
    code = -1 if code is None else code
    what = why or describe(code)
    if policy.should_restart(code, restarts):
        delay = policy.delay(restarts)
        reason = f"{what}, restart {restarts + 1}/{policy.max_restarts} in {delay:g}s"
        return Outcome(D.RESTARTING, (D.RUNNING,), reason, code, delay, restarts + 1)
    final = D.SUCCEEDED if code == 0 and not why else D.FAILED
    reason = what
    if final == D.FAILED and policy.policy != "never" and restarts >= policy.max_restarts:
        reason += f", gave up after {restarts} restarts"
    return Outcome(final, (D.RUNNING,), reason, code, restarts=restarts)


def on_start_failure(policy: RestartPolicy, restarts: int, reason: str, state: D) -> Outcome:
    """A process that could not be started at all (``reason``: what failed and the OS's error),
    from ``state`` (``scheduled`` or ``restarting``): the restart policy's next step, and finally
    ``failed``. Retried like a failure whatever the policy says of exit codes, since it never ran."""
    if policy.policy != "never" and restarts < policy.max_restarts:
        delay = policy.delay(restarts)
        return Outcome(D.RESTARTING, (state,), f"{reason}; restart {restarts + 1}/{policy.max_restarts} in {delay:g}s",
                       None, delay, restarts + 1)  # fmt: skip
    if policy.policy != "never":
        reason += f"; gave up after {restarts} restarts"
    return Outcome(D.FAILED, (state,), reason, None, restarts=restarts)
