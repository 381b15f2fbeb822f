"""What operators watch: dm's Prometheus metrics, `dm status` / `dm watch`, and Flower's guard.

Against real servers and real node processes; the metrics exporter and `dm up` run as
subprocesses, each stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dm.embedded import _running, free_port, stop_pid
from dm.errors import ConfigError
from dm.launcher import flower_credentials, is_loopback
from dm.metrics import EventTail
from dm.registry import Registry
from tests.system import ROOT, System, wait_for

Labels = tuple[tuple[str, str], ...]


def scrape(port: int) -> dict[tuple[str, Labels], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels); it must parse."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def node_states(samples: dict[tuple[str, Labels], float]) -> dict[str, str]:
    return {dict(lb)["node"]: dict(lb)["state"] for (name, lb), v in samples.items() if name == "dm_node_state" and v}


def deployment_counts(samples: dict[tuple[str, Labels], float]) -> dict[str, int]:
    return {dict(lb)["state"]: int(v) for (name, lb), v in samples.items() if name == "dm_deployments" and v}


def start_exporter(system: System) -> int:
    port = free_port()
    system.spawn("metrics", [sys.executable, "-m", "dm", "metrics", "--port", str(port)])
    wait_for(lambda: _listening(port), 15, what="the metrics exporter to listen")
    return port


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def status(system: System) -> dict[str, Any]:
    result = system.dm("status", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_metrics_agree_with_status_after_deploys_a_crash_restart_and_a_node_kill(make_system):
    # Given two nodes and dm's exporter beside them
    system = make_system(nodes=2)
    port = start_exporter(system)
    system.add_examples("hello", "service", "crash")

    # When hello runs to its end, crash restarts until it gives up, service runs, and service's node is killed
    hello = system.deploy("hello")
    crash = system.deploy("crash")
    system.wait_state(hello["id"], "succeeded")
    system.wait_state(crash["id"], "failed", timeout=30)
    service = system.deploy("service", args={"interval": 0.2})
    first = system.wait_state(service["id"], "running")
    os.kill(system.node_pid(first["node"]), signal.SIGKILL)
    moved = wait_for(
        lambda: (d := system.deployment(service["id"]))["state"] == "running" and d["generation"] > 1 and d,
        20,
        what="service running again on the other node",
    )

    # Then the metrics show what `dm status` shows: node states and deployments by state
    # (once the exporter has read the last events, which the relay copies a moment after each change)
    events = system.ctl.registry.events
    counted = (("placements", "scheduled"), ("restarts", "restarting"), ("failovers", "lost"))

    def caught_up() -> dict[Any, float] | None:
        samples = scrape(port)
        agree = all(samples[(f"dm_{n}_total", ())] == events.count_documents({"state": s}) for n, s in counted)
        # the failover's placement is the last event: 4 placements in all
        return samples if agree and samples[("dm_placements_total", ())] >= 4 else None

    samples = wait_for(caught_up, 15, what="the exporter's counters to match the events")
    shown = status(system)
    assert node_states(samples) == {n["id"]: n["state"] for n in shown["nodes"]}
    assert node_states(samples)[first["node"]] == "dead" and node_states(samples)[moved["node"]] == "up"
    assert deployment_counts(samples) == shown["deployments"] == {"succeeded": 1, "failed": 1, "running": 1}
    # and the counters are the registry's events: 4 placements (one a failover), 3 restarts, 1 failover
    assert samples[("dm_placements_total", ())] == 4
    assert samples[("dm_restarts_total", ())] == 3
    assert samples[("dm_failovers_total", ())] == 1
    assert samples[("dm_placement_latency_seconds_count", ())] >= 3
    assert samples[("dm_failover_seconds_count", ())] == 1
    assert 0 <= samples[("dm_failover_seconds_sum", ())] < 20
    assert samples[("dm_metrics_up", ())] == 1
    assert 0 <= samples[("dm_heartbeat_check_lag_seconds", ())] < 5
    assert samples[("dm_node_deployments", (("host", socket.gethostname()), ("node", moved["node"])))] == 1


def test_a_killed_node_is_dead_within_its_lease_in_status_watch_and_metrics(make_system, tmp_path: Path):
    # Given two nodes, no heartbeat check (so only the lease can tell), and `dm watch` running
    system = make_system(nodes=2, beat=False, lease_ttl=3)
    port = start_exporter(system)
    watch_out = tmp_path / "watch.out"
    with open(watch_out, "wb") as out:
        watch = subprocess.Popen(
            [sys.executable, "-m", "dm", "watch", "--interval", "0.5"],
            cwd=ROOT, env=system.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "node-2" in watch_out.read_text(), 15, what="dm watch to show node-2")

        # When node-2's agent is killed with SIGKILL
        os.kill(system.node_pid("2"), signal.SIGKILL)
        killed = time.monotonic()

        # Then within the lease (3 s) and a little, status and the metrics say dead
        wait_for(lambda: {n["id"]: n["state"] for n in status(system)["nodes"]}.get("2") == "dead", 6,
                 interval=0.2, what="dm status to show node-2 dead")  # fmt: skip
        assert time.monotonic() - killed < system.settings.lease_ttl + 1.5
        assert node_states(scrape(port)) == {"1": "up", "2": "dead"}
        assert system.ctl.registry.get_node("2")["state"] == "up"  # the registry does not know yet: the view does
        # and so does dm watch, which stops cleanly on Ctrl-C
        wait_for(lambda: "dead" in watch_out.read_text().rsplit("dm status every", 1)[-1], 3, what="watch: dead")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        stop_pid(watch.pid, 5)
    last = watch_out.read_text().rsplit("dm status every", 1)[-1]
    assert "Ctrl-C quits" in last and "node-1" in last


def run_dm(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dm", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def get(url: str, auth: str | None = None) -> int:
    headers = {"Authorization": "Basic " + b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flower_on_every_interface_needs_a_password_and_asks_for_it(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DM_", "FLOWER_"))}
    env["DM_HOME"] = str(tmp_path / "dm-home")
    flower_port = free_port()
    args = ["up", "--detach", "--nodes", "0", "--no-bridge", "--flower-address", "0.0.0.0",
            "--flower-port", str(flower_port), "--metrics-port", str(free_port())]  # fmt: skip

    # When dm up is asked for Flower on 0.0.0.0 without DM_FLOWER_AUTH
    refused = run_dm(env, *args)

    # Then it refuses with what to do, and starts nothing
    assert refused.returncode == 1
    assert "DM_FLOWER_AUTH=user:password" in refused.stderr
    assert not (tmp_path / "dm-home" / "stack.json").exists()
    assert not _listening(flower_port)

    # When it is given a password
    env["DM_FLOWER_AUTH"] = "ops:s3cret-pw"
    up = run_dm(env, *args)
    state_file = tmp_path / "dm-home" / "stack.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "password required" in up.stdout
        # Then Flower answers 401 without the credentials and 200 with them (connecting through loopback)
        url = f"http://127.0.0.1:{flower_port}/"
        assert get(url) == 401
        assert get(url, "ops:wrong") == 401
        assert get(url, "ops:s3cret-pw") == 200
        # and the password is not on any command line `ps` shows
        flower_cmdline = Path(f"/proc/{state['processes']['flower']}/cmdline").read_bytes()
        assert b"s3cret" not in flower_cmdline
    finally:
        down = run_dm(env, "down")
    assert down.returncode == 0, down.stderr
    pids = [*state["processes"].values(), *state["servers"].values()]
    assert pids and not [pid for pid in pids if _running(pid)]


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("", False), ("10.0.0.5", False), ("dm.example.org", False)],
)  # fmt: skip
def test_only_loopback_addresses_count_as_private(address: str, loopback: bool):
    assert is_loopback(address) is loopback


def test_a_malformed_flower_password_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DM_FLOWER_AUTH", "just-a-user")
    with pytest.raises(ConfigError, match="user:password"):
        flower_credentials("127.0.0.1")
    monkeypatch.setenv("DM_FLOWER_AUTH", "a:1,b:2")
    assert flower_credentials("0.0.0.0") == "a:1,b:2"


def test_the_event_tail_reads_up_to_the_relays_mark_and_counts_each_once(stack):
    # Given events numbered by the relay, and its mark
    registry = Registry(stack.mongo_url, "dm_tail_" + uuid.uuid4().hex[:8])
    db = registry.db
    t0 = time.time()

    def event(state: str, generation: int, at: float) -> None:
        n = db.events.count_documents({})
        db.events.insert_one({"_id": n + 1, "seq": n + 1, "deployment_id": "d1", "state": state,
                              "generation": generation, "rev": n, "time": at})  # fmt: skip

    def mark() -> None:
        db.meta.update_one({"_id": "relay"}, {"$set": {"seq": db.events.count_documents({})}}, upsert=True)

    try:
        event("pending", 0, t0)
        event("scheduled", 1, t0 + 0.04)
        event("running", 1, t0 + 0.1)
        mark()
        tail = EventTail(registry)
        assert tail.poll() == 3

        # When a batch is written but not yet marked, it is not read; once marked, each event once
        event("lost", 1, t0 + 1.0)
        event("scheduled", 2, t0 + 1.2)
        event("running", 2, t0 + 1.5)
        assert tail.poll() == 0
        mark()
        assert tail.poll() == 3
        assert tail.poll() == 0

        # Then the counters and timings are those of the events
        samples = {s.name: s.value for family in tail.collect() for s in family.samples if not s.labels}
        assert samples["dm_placements_total"] == 2 and samples["dm_failovers_total"] == 1
        assert samples["dm_placement_latency_seconds_count"] == 1
        assert samples["dm_placement_latency_seconds_sum"] == pytest.approx(0.04, abs=1e-6)
        assert samples["dm_failover_seconds_count"] == 1
        assert samples["dm_failover_seconds_sum"] == pytest.approx(0.5, abs=1e-6)
    finally:
        db.client.drop_database(db.name)
