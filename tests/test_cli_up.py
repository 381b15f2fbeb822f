"""`dm up` then `dm deploy hello --wait` then `dm down`, from the checkout, as a new user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dm.embedded import _running, free_port
from tests.system import ROOT


def run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dm", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_up_deploy_wait_down_on_the_embedded_stack(tmp_path: Path):
    # Given a fresh DM_HOME and no server URLs: dm up starts its own servers
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
    env["DM_HOME"] = str(tmp_path / "dm-home")
    up = run(env, "up", "--detach", "--flower-port", str(free_port()), "--metrics-port", str(free_port()))
    state_file = tmp_path / "dm-home" / "stack.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ready" in up.stdout and "node-1 up" in up.stdout

        # When a user adds the examples and deploys hello, waiting for it
        added = run(env, "algorithms", "add", str(ROOT / "examples" / "algorithms"))
        assert added.returncode == 0, added.stderr
        deployed = run(env, "deploy", "hello", "--arg", "who=newcomer", "--wait", "--json")

        # Then it succeeded and its output is in dm logs
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        dep = json.loads(deployed.stdout)
        assert dep["state"] == "succeeded"
        logs = run(env, "logs", dep["id"])
        assert '"who": "newcomer"' in logs.stdout
        status = run(env, "status", "--json")
        assert json.loads(status.stdout)["deployments"] == {"succeeded": 1}
    finally:
        down = run(env, "down")
    assert down.returncode == 0, down.stderr
    pids = [*state["processes"].values(), *state["servers"].values()]
    assert pids and not [pid for pid in pids if _running(pid)]
    assert not state_file.exists()


def test_commands_without_a_running_system_say_what_to_do(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
    env["DM_HOME"] = str(tmp_path / "empty-home")
    result = run(env, "deployments")
    assert result.returncode == 1
    assert "dm up" in result.stderr


def test_up_in_the_foreground_stops_everything_on_ctrl_c(tmp_path: Path):
    # Given `dm up` running in the foreground
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
    env["DM_HOME"] = str(tmp_path / "dm-home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dm", "up", "--no-bridge", "--no-flower", "--no-metrics"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        state = json.loads((tmp_path / "dm-home" / "stack.json").read_text())
        pids = [*state["processes"].values(), *state["servers"].values()]
        assert any("node-1 up" in line for line in lines), lines

        # When the user presses Ctrl-C
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Then it stops every process it started, and says so
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    assert not [pid for pid in pids if _running(pid)]
