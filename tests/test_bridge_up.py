"""`dm up` runs the bridge against its embedded Tansu: a scheduler's request runs, its events come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from bridge.messages import Event
from dm import constants as c
from dm.embedded import stop_pid
from dm.settings import read_stack_state
from tests.system import EXAMPLES, ROOT, wait_for
from tests.test_bridge_support import read_events


def test_dm_up_starts_a_bridge_that_takes_requests_and_reports_events(tmp_path: Path) -> None:
    # Given `dm up` with no server configured: the embedded stack, Tansu included
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
    env |= {"DM_HOME": str(home), "PYTHONPATH": str(ROOT)}

    def dm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dm", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    state: dict[str, Any] = {}
    try:
        up = dm("up", "--detach", "--no-flower", "--nodes", "1")
        assert up.returncode == 0, up.stdout + up.stderr
        state = read_stack_state(home)
        assert state["kafka_bootstrap"] and "bridge" in state["processes"]
        assert dm("algorithms", "add", str(EXAMPLES / "hello")).returncode == 0

        # When a scheduler sends a request to dm.requests
        producer = KafkaProducer(bootstrap_servers=state["kafka_bootstrap"])
        body = {"request_id": "sched-1", "algorithm": "hello", "args": {"who": "scheduler"}}
        producer.send(c.REQUESTS_TOPIC, key=b"sched-1", value=json.dumps(body).encode()).get(timeout=30)
        producer.close()

        # Then it runs, and dm.events tells the scheduler so, from pending to succeeded
        def deployment() -> dict[str, object] | None:
            listed = dm("deployments", "--json")
            rows = json.loads(listed.stdout) if listed.returncode == 0 else []
            return next((r for r in rows if r["request_id"] == "sched-1" and r["state"] == "succeeded"), None)

        dep = wait_for(deployment, 90, interval=0.5, what="the request to succeed")

        def succeeded(events: list[Event]) -> bool:
            return any(e.state == "succeeded" for e in events)

        events = read_events(state["kafka_bootstrap"], c.EVENTS_TOPIC, succeeded, timeout=30)
        assert [e.state for _, e in events] == ["pending", "scheduled", "running", "succeeded"]
        assert {(e.deployment_id, e.request_id) for _, e in events} == {(dep["id"], "sched-1")}
    finally:
        dm("down", timeout=60)
        for pid in [*state.get("processes", {}).values(), *state.get("servers", {}).values()]:
            stop_pid(pid, 5)  # what `dm down` left running, if anything
    log = (home / "logs" / "bridge.log").read_text()
    assert "Traceback" not in log, log[-3000:]
