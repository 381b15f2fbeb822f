"""dm runs as a Redis ACL user with exactly the categories docs/operations.md gives it: every
command but the dangerous ones, plus INFO and CLIENT LIST (how a kill -9 is seen at once)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from dm import keys as k
from dm.embedded import find_redis_server, free_port, stop_pid
from tests.system import System, wait_for

pytestmark = pytest.mark.slow

#: the rule of docs/operations.md ("Keeping it private"), word for word
DM_ACL = "on >dm-secret ~* &* +@all -@dangerous +info +client|list"


def test_a_system_runs_and_fails_over_as_the_acl_user_the_docs_describe(stack, tmp_path: Path):
    # Given a Redis whose only usable user is dm's, with the documented rule
    port = free_port()
    (tmp_path / "redis").mkdir()
    acl = tmp_path / "redis" / "users.acl"
    acl.write_text(f"user default off\nuser dm {DM_ACL}\n")
    server = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path / "redis"), "--aclfile", str(acl)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"redis://dm:dm-secret@127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _answers(url), 10, what="the ACL Redis")
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(url).flushall()  # the rule keeps the dangerous ones out
        system = System(url, stack.mongo_url, tmp_path / "home")
        try:
            system.start(nodes=2)
            system.add_examples("hello", "service")

            # When a deploy runs, and then a node running a service is killed with SIGKILL
            hello = system.deploy("hello", args={"who": "acl"})
            assert system.wait_state(hello["id"], "succeeded", "failed")["state"] == "succeeded"
            service = system.wait_state(system.deploy("service", args={"interval": 0.2})["id"], "running")
            # (the detector judges a presence connection once it has seen it in this Redis run)
            wait_for(lambda: system.ctl.redis.hget(k.PRESENT_IN, service["node"]), 30, what="the node seen present")
            os.kill(system.node_pid(service["node"]), signal.SIGKILL)
            killed = time.monotonic()

            # Then it runs elsewhere, seen through the presence connection (CLIENT LIST), not the lease
            moved = wait_for(lambda: (d := system.deployment(service["id"]))["state"] == "running"
                             and d["node"] != service["node"] and d, 30, what="the service elsewhere")  # fmt: skip
            assert moved["generation"] > service["generation"]
            lost = [e for e in system.ctl.registry.list_events(service["id"], limit=100) if e["state"] == "lost"]
            assert lost and "connection to Redis closed" in lost[0]["reason"], lost
            assert time.monotonic() - killed < system.settings.lease_ttl
        finally:
            system.stop()
    finally:
        stop_pid(server.pid, 10)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False
