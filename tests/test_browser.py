"""Flower, started by `dm up`, seen in a real headless Chromium: every node, the run tasks, and
the control store's health on a node's page.

Needs Debian's `chromium` and `chromium-driver` (scripts/ci-deps.sh installs them); the
test fails, never skips, without them. The screenshot lands in the test's tmp_path and
in test-output/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dm.embedded import _running, free_port, stop_pid
from tests.system import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--window-size=1400,900"]  # fmt: skip


def run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dm", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium through Debian's chromedriver; it and its browser stopped by PID."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: run scripts/ci-deps.sh (Debian's chromium, chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    started = [service.process.pid, *(p.pid for p in psutil.Process(service.process.pid).children(recursive=True))]
    try:
        yield driver
    finally:
        driver.quit()
        for pid in started:
            stop_pid(pid, 5)


def test_flower_shows_every_node_and_the_run_tasks(browser, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Given `dm up` with two nodes on a fresh home and no server URLs (the embedded stack)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DM_", "FLOWER_"))}
    env["DM_HOME"] = str(tmp_path / "dm-home")
    flower_port, metrics_port = free_port(), free_port()
    up = run(env, "up", "--detach", "--nodes", "2", "--flower-port", str(flower_port),
             "--metrics-port", str(metrics_port))  # fmt: skip
    state_file = tmp_path / "dm-home" / "stack.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for line in ("node-1 up", "node-2 up", f"flower at http://127.0.0.1:{flower_port}",
                     f"metrics at http://127.0.0.1:{metrics_port}/metrics", "ready: "):  # fmt: skip
            assert line in up.stdout, up.stdout
        assert run(env, "algorithms", "add", str(ROOT / "examples" / "algorithms")).returncode == 0
        deployed = run(env, "deploy", "hello", "--arg", "who=flower", "--wait", "--json")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        dep = json.loads(deployed.stdout)

        # When an operator opens Flower's workers page (the table is filled by JS)
        browser.get(f"http://127.0.0.1:{flower_port}/workers")  # type: ignore[attr-defined]
        table = (By.ID, "workers-table")
        WebDriverWait(browser, 30, poll_frequency=0.3).until(
            lambda d: all(f"node-{n}@" in d.find_element(*table).text for n in (1, 2)),
            message="both nodes in Flower's workers table",
        )
        shot = tmp_path / "flower-workers.png"
        assert browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
        (ROOT / "test-output").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "test-output" / shot.name)

        # Then both nodes are there by name, and the tasks page shows the run task with its algorithm and id
        names = browser.find_element(*table).text  # type: ignore[attr-defined]
        assert {f"node-1@{socket.gethostname()}", f"node-2@{socket.gethostname()}"} <= set(names.split())
        browser.get(f"http://127.0.0.1:{flower_port}/tasks?name=dm.run")  # dm.heartbeat fills the rest  # type: ignore[attr-defined]
        WebDriverWait(browser, 30, poll_frequency=0.3).until(
            lambda d: "dm.run" in d.page_source and dep["id"] in d.page_source and "hello" in d.page_source,
            message="the dm.run task of the deployment in Flower's tasks page",
        )
        browser.save_screenshot(str(tmp_path / "flower-tasks.png"))  # type: ignore[attr-defined]
        shutil.copy(tmp_path / "flower-tasks.png", ROOT / "test-output" / "flower-tasks.png")

        # and a node's page says how the control store is doing (tab Other: rows from the node's stats)
        node_name = f"node-1@{socket.gethostname()}"
        browser.get(f"http://127.0.0.1:{flower_port}/worker/{node_name}")  # type: ignore[attr-defined]
        WebDriverWait(browser, 30, poll_frequency=0.3).until(
            lambda d: d.find_elements(By.ID, "worker-tab-other"), message="the Other tab of node-1's page"
        )
        browser.find_element(By.ID, "worker-tab-other").click()  # type: ignore[attr-defined]
        other = (By.ID, "tab-other")
        WebDriverWait(browser, 10, poll_frequency=0.3).until(
            lambda d: "dm control store" in d.find_element(*other).text, message="the control store rows"
        )
        rows = browser.find_element(*other).text  # type: ignore[attr-defined]
        browser.save_screenshot(str(tmp_path / "flower-node.png"))  # type: ignore[attr-defined]
        shutil.copy(tmp_path / "flower-node.png", ROOT / "test-output" / "flower-node.png")
        for row in ("dm control store Redis reachable", "dm nodes in grace", "dm node lease renewed",
                    "dm node in grace no", "dm last outage"):  # fmt: skip
            assert row in rows, rows

        # and Flower's own /metrics works beside dm's, which shows both nodes up
        for port, prefix in ((flower_port, "flower_"), (metrics_port, "dm_node_state")):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert any(f.name.startswith(prefix) for f in text_string_to_metric_families(text)), port
        assert 'dm_node_state{host="' in text and text.count('state="up"} 1.0') == 2
    finally:
        down = run(env, "down")
    assert down.returncode == 0, down.stderr
    pids = [*state["processes"].values(), *state["servers"].values()]
    assert {"control", "beat", "flower", "metrics"} <= set(state["processes"])
    assert pids and not [pid for pid in pids if _running(pid)]
