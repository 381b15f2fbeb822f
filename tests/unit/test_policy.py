"""The restart policy and the supervisor's policy core (workers/policy.py)."""

from __future__ import annotations

import pytest

from dm.lifecycle import D
from dm.models import RestartPolicy
from workers.policy import on_exit, on_start_failure

ON_FAILURE = RestartPolicy("on-failure", max_restarts=3, backoff=0.5, backoff_max=2.0)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [ON_FAILURE.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("policy", "code", "restarts", "restart"),
    [
        ("never", 1, 0, False),
        ("on-failure", 0, 0, False),
        ("on-failure", 1, 0, True),
        ("on-failure", 1, 3, False),
        ("always", 0, 0, True),
        ("always", 0, 3, False),
    ],
)
def test_should_restart(policy: str, code: int, restarts: int, restart: bool) -> None:
    assert RestartPolicy(policy, max_restarts=3).should_restart(code, restarts) is restart


def test_a_failed_exit_is_restarted_with_its_backoff() -> None:
    out = on_exit(ON_FAILURE, 1, 1)
    assert out is not None
    assert (out.state, out.expect, out.delay, out.restarts) == (D.RESTARTING, (D.RUNNING,), 1.0, 2)
    assert out.reason == "exit code 1, restart 2/3 in 1s"


def test_after_the_last_restart_it_fails_and_says_so() -> None:
    out = on_exit(ON_FAILURE, 1, 3)
    assert out is not None and out.state == D.FAILED and out.reason == "exit code 1, gave up after 3 restarts"


def test_a_clean_exit_succeeds() -> None:
    out = on_exit(ON_FAILURE, 0, 0)
    assert out is not None and out.state == D.SUCCEEDED


def test_a_kill_by_signal_is_named() -> None:
    out = on_exit(RestartPolicy("never"), -9, 0)
    assert out is not None and (out.state, out.reason) == (D.FAILED, "killed by signal 9")


def test_a_known_cause_is_the_reason_and_counts_as_a_failure() -> None:
    out = on_exit(RestartPolicy("never"), -9, 0, why="out of memory (limit 80 MiB)")
    assert out is not None and (out.state, out.reason) == (D.FAILED, "out of memory (limit 80 MiB)")


def test_kills_by_the_supervisor_report_what_they_mean() -> None:
    stopped = on_exit(ON_FAILURE, -15, 0, killed_for="stop")
    lapsed = on_exit(ON_FAILURE, -9, 0, killed_for="lapse")
    assert stopped is not None and (stopped.state, stopped.expect) == (D.STOPPED, (D.STOPPING,))
    assert lapsed is not None and lapsed.state == D.LOST
    assert on_exit(ON_FAILURE, -9, 0, killed_for="fence") is None
    assert on_exit(ON_FAILURE, -15, 0, killed_for="shutdown") is None


def test_a_start_that_fails_is_retried_then_failed_with_its_cause() -> None:
    cause = "cannot start: [Errno 7] Argument list too long"
    first = on_start_failure(ON_FAILURE, 0, cause, D.SCHEDULED)
    assert (first.state, first.expect, first.restarts, first.delay) == (D.RESTARTING, (D.SCHEDULED,), 1, 0.5)
    assert first.reason == f"{cause}; restart 1/3 in 0.5s"
    last = on_start_failure(ON_FAILURE, 3, cause, D.RESTARTING)
    assert (last.state, last.expect) == (D.FAILED, (D.RESTARTING,))
    assert last.reason == f"{cause}; gave up after 3 restarts"
    never = on_start_failure(RestartPolicy("never"), 0, "cannot start: embedded null byte", D.SCHEDULED)
    assert (never.state, never.reason) == (D.FAILED, "cannot start: embedded null byte")
