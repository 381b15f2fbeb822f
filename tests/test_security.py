"""Security of issue 11: signed run and kill orders, credentials kept out of output, argv and
logs, DM_HOME's permissions, and oversized demand refused at `dm algorithms add`."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dm import constants as c
from dm import deployer, signing
from dm.app import app
from dm.models import DeployRequest
from dm.sender import TaskSender
from dm.settings import Settings, mask_url
from tests.system import EXAMPLES, System, wait_for

# --- signing: unit ----------------------------------------------------------------


def _payload() -> dict[str, Any]:
    return {"id": "d1", "generation": 2, "command": ["python", "main.py"], "env": {"A": "é"}, "args": {"n": 1.5}}


@pytest.mark.parametrize("source", ["env", "file"])
def test_sign_and_verify_round_trip_and_any_change_is_refused(tmp_path: Path, source: str) -> None:
    settings = Settings(home=tmp_path / "home", signing_key="k" * 32 if source == "env" else "")
    signed = signing.sign(_payload(), settings)
    assert signing.verify(json.loads(json.dumps(signed)), settings)  # survives the trip through JSON
    for field, value in [("command", ["sh", "-c", "id"]), ("generation", 3), ("env", {}), ("args", {"n": 2})]:
        assert not signing.verify({**signed, field: value}, settings), field
    assert not signing.verify(_payload(), settings)  # unsigned
    assert not signing.verify({**signed, "sig": 1}, settings)
    assert not signing.verify("not a dict", settings)
    assert not signing.verify(signed, settings.with_(signing_key="another key of enough length"))
    # a run order's signature is no kill order's
    args = signing.kill_args("d1", 2, "stop", settings)
    assert signing.verify_kill(*args, settings=settings)
    assert not signing.verify_kill("d1", 3, "stop", args[3], settings)
    assert not signing.verify({**signing.kill_order("d1", 2, "stop"), "sig": args[3]}, settings)


def test_the_key_file_is_made_once_0600_and_never_half_read(tmp_path: Path) -> None:
    homes = [Settings(home=tmp_path / "home")] * 8
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda s=s: keys.append(signing._key_file(signing.key_path(s)))) for s in homes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / "home" / "signing.key"
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path / "home") == ["signing.key"]  # no temp file left


# --- signing: against a real node ---------------------------------------------------


def _forged_message(sender: TaskSender, queue: str, payload: dict[str, Any]) -> bytes:
    """A dm.run in kombu's Redis envelope, as anyone with Redis access can write it: the
    genuine template, with the payload swapped after signing."""
    envelope = json.loads(sender.message(("dm.run", queue, [payload], {}, None)))
    body = json.loads(base64.b64decode(envelope["body"]))
    body[0] = [payload]
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(envelope).encode()


def test_a_forged_run_order_starts_nothing_and_a_genuine_one_runs(make_system, tmp_path: Path) -> None:
    # Given a node, and a deployment recorded scheduled on it whose order was never sent
    system = make_system(nodes=1, start_timeout=300)
    system.add_examples("service")
    node_id = system.wait_nodes_up(1)[0]
    ctl = system.ctl
    algorithm = ctl.registry.get_algorithm("service")
    doc, _ = ctl.registry.create_deployment(DeployRequest("service"), algorithm, node=node_id, reason="test")
    marker = tmp_path / "pwned"
    evil = {**deployer.run_payload(doc), "command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}
    sender = TaskSender(app)
    queue = c.NODE_QUEUE_PREFIX + node_id
    node_hash = c.NODE_KEY.format(node_id)

    # When forged orders are pushed straight onto its queue: unsigned, signed with another key,
    # and a genuine signature over a changed command
    other = system.settings.with_(signing_key="someone else's key, long enough")
    genuine_sig = signing.sign(deployer.run_payload(doc), system.settings)["sig"]
    for forged in [evil, signing.sign(evil, other), {**evil, "sig": genuine_sig}]:
        system.ctl.redis.lpush(sender.key(queue), _forged_message(sender, queue, forged))

    # Then the node refuses each, counts and logs it, and starts nothing
    wait_for(lambda: system.ctl.redis.hget(node_hash, "refused_orders") == "3", 30, what="3 refused orders")
    node_log = (system.home / "nodes" / f"node-{node_id}.log").read_text()
    assert node_log.count("refused a dm.run order with a missing or wrong signature") == 3
    now = ctl.registry.get_deployment(doc["_id"])
    assert (now["state"], now.get("pid"), now["generation"]) == ("scheduled", None, 1)
    assert not marker.exists()

    # When the control plane sends the genuine order
    deployer.dispatch(doc)

    # Then it runs the command it recorded
    running = system.wait_state(doc["_id"], "running", timeout=60)
    assert running["pid"] and running["node"] == node_id
    assert not marker.exists()

    # And a forged kill is refused too, while a genuine stop goes through
    app.send_task("dm.kill", args=[doc["_id"], 1, "forged"], queue=queue)
    wait_for(lambda: system.ctl.redis.hget(node_hash, "refused_orders") == "4", 30, what="the forged kill refused")
    assert ctl.registry.get_deployment(doc["_id"])["state"] == "running"
    deployer.stop(ctl, doc["_id"])
    assert system.wait_state(doc["_id"], "stopped", timeout=60)["state"] == "stopped"


# --- credentials --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:s3cret@h/0", "rediss://user:***@h/0"),
        ("redis://s3cret@h/0", "redis://***@h/0"),
        ("mongodb://u:s3cret@a:1,b:2/dm?authSource=admin", "mongodb://u:***@a:1,b:2/dm?authSource=admin"),
        ("mongodb://h/?tlsCertificateKeyFilePassword=s3cret", "mongodb://h/?tlsCertificateKeyFilePassword=***"),
        ("http://admin:s3cret@127.0.0.1:5555", "http://admin:***@127.0.0.1:5555"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("127.0.0.1:9092", "127.0.0.1:9092"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in repr(Settings(redis_url=url, mongo_url=url, signing_key="s3cret-signing-key"))


def test_oversized_demand_and_bad_archives_are_refused_by_algorithms_add_and_nothing_is_stored(
    stack, tmp_path: Path
) -> None:
    system = System(stack.redis_url, stack.mongo_url, tmp_path / "home", node_cpus=2, node_memory=512)
    try:
        big = tmp_path / "big"
        big.mkdir()
        (big / "main.py").write_text("print('hi')\n")
        (big / "algorithm.toml").write_text('name = "big"\nversion = "1"\ncommand = ["python", "main.py"]\ncpu = 4\n')
        deep = tmp_path / "deep"
        (deep / "/".join(["d"] * 40)).mkdir(parents=True)
        (deep / "main.py").write_text("")
        (deep / "algorithm.toml").write_text('name = "deep"\nversion = "1"\ncommand = ["python", "main.py"]\n')
        for directory, message in [
            (big, "declares 4 cpu, but the largest node provider 'local' starts has 2 cpu and 512 MiB"),
            (deep, "is 33 levels deep, past the limit of 32"),
        ]:
            done = system.dm("algorithms", "add", str(directory))
            assert done.returncode == 1, done.stdout
            assert message in done.stderr
        assert system.ctl.registry.algorithms.count_documents({}) == 0
        assert system.ctl.registry.db["packages.files"].count_documents({}) == 0
        # what fits is added
        ok = system.dm("algorithms", "add", str(EXAMPLES / "hello"))
        assert ok.returncode == 0, ok.stderr
    finally:
        system.stop()
