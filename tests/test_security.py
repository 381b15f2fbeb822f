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
from dm import keys as k
from dm.adapters.celery_dispatch import run_payload
from dm.app import app
from dm.models import DeployRequest
from dm.sender import TaskSender
from dm.settings import Settings, mask_url
from tests.servers import stack_factory  # noqa: F401  (fixture: private servers for one test)
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
    evil = {**run_payload(doc), "command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]}
    sender = TaskSender(app)
    queue = c.NODE_QUEUE_PREFIX + node_id
    node_hash = k.NODE.format(node_id)

    # When forged orders are pushed straight onto its queue: unsigned, signed with another key,
    # and a genuine signature over a changed command
    other = system.settings.with_(signing_key="someone else's key, long enough")
    genuine_sig = signing.sign(run_payload(doc), system.settings)["sig"]
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
    system.ctl.ports.dispatcher.run(doc, None, None)

    # Then it runs the command it recorded
    running = system.wait_state(doc["_id"], "running", timeout=60)
    assert running["pid"] and running["node"] == node_id
    assert not marker.exists()

    # And a forged kill is refused too, while a genuine stop goes through
    app.send_task("dm.kill", args=[doc["_id"], 1, "forged"], queue=queue)
    wait_for(lambda: system.ctl.redis.hget(node_hash, "refused_orders") == "4", 30, what="the forged kill refused")
    assert ctl.registry.get_deployment(doc["_id"])["state"] == "running"
    deployer.stop(ctl.ports, doc["_id"])
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


REDIS_PW = "redis-pw-Zq81x"
MONGO_PW = "mongo-pw-Kd27v"


def _secured_stack(make_stack: Any) -> tuple[str, str]:
    """A private Redis and MongoDB that require passwords: their URLs, carrying them."""
    import pymongo
    import redis

    servers = make_stack(kafka=False)
    redis.Redis.from_url(servers.redis_url).config_set("requirepass", REDIS_PW)
    with pymongo.MongoClient(servers.mongo_url) as mongo:
        mongo.admin.command("createUser", "dm", pwd=MONGO_PW, roles=["root"])
    host_port = servers.mongo_url.removeprefix("mongodb://").rstrip("/")
    return (
        servers.redis_url.replace("redis://", f"redis://:{REDIS_PW}@"),
        f"mongodb://dm:{MONGO_PW}@{host_port}/?authSource=admin",
    )


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


@pytest.mark.slow
def test_dm_up_with_passwords_in_the_urls_shows_none_and_keeps_dm_home_private(
    stack_factory: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    from dm.embedded import free_port
    from tests.system import ROOT

    # Given servers that require passwords, and nodes started through the command provider
    redis_url, mongo_url = _secured_stack(stack_factory)
    home = tmp_path / "dm-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
    env.update(DM_HOME=str(home), DM_REDIS_URL=redis_url, DM_MONGO_URL=mongo_url, DM_PROVIDER="command",
               DM_NODE_START_COMMAND="{python} -m dm node --env-file - --id {node_id} --cpus {cpus} --memory {memory}",
               PYTHONPATH=str(ROOT))  # fmt: skip
    flower, metrics = free_port(), free_port()

    def dm(*args: str) -> Any:
        import subprocess

        return subprocess.run([sys.executable, "-m", "dm", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)  # fmt: skip

    # When the user starts it all and deploys
    up = dm("up", "--detach", "--no-bridge", "--flower-port", str(flower), "--metrics-port", str(metrics))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        added = dm("algorithms", "add", str(EXAMPLES / "hello"))
        deployed = dm("deploy", "hello", "--arg", "who=auth", "--wait", "--json")
        status = dm("status", "--json")
        state = json.loads((home / "stack.json").read_text())
        from dm.control import Control

        ctl = Control(Settings.from_env(env))
        node_pids = [int(n["pid"]) for n in ctl.registry.list_nodes() if n.get("pid")]
        cmdlines = [_cmdline(pid) for pid in [*state["processes"].values(), *node_pids]]
        state_mode = stat.S_IMODE((home / "stack.json").stat().st_mode)
    finally:
        down = dm("down")
    assert down.returncode == 0, down.stderr

    # Then it works, with the passwords masked in what it prints
    assert added.returncode == 0 and deployed.returncode == 0, added.stderr + deployed.stdout + deployed.stderr
    assert json.loads(deployed.stdout)["state"] == "succeeded"
    ready = next(line for line in up.stdout.splitlines() if line.startswith("ready"))
    assert "redis redis://:***@127.0.0.1:" in ready and "mongo mongodb://dm:***@127.0.0.1:" in ready
    # and no password in any output, command line or file under DM_HOME but the 0600 ones that must hold it
    for text in [up.stdout, up.stderr, added.stdout, deployed.stdout, status.stdout, down.stdout, *cmdlines]:
        assert REDIS_PW not in text and MONGO_PW not in text, text
    assert node_pids and all("--env-file -" in line for line in cmdlines[-len(node_pids) :])
    assert state_mode == 0o600  # stack.json holds the URLs (`dm down` removed it)
    holders = set((home / "nodes").glob("*.env"))
    for path in home.rglob("*"):
        if path.is_file() and path not in holders:
            data = path.read_bytes()
            assert REDIS_PW.encode() not in data and MONGO_PW.encode() not in data, path
    # DM_HOME is its owner's alone, and so are the files that hold secrets
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    private = [home / "signing.key", *holders, *(home / "logs").glob("*.log"), *(home / "nodes").glob("*.log")]
    assert len(private) >= 5
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # dm status --json lists every endpoint, masked
    where = json.loads(status.stdout)["endpoints"]
    assert where["redis"] == mask_url(redis_url) and "***" in where["redis"]
    assert where["mongo"] == mask_url(mongo_url) and "***" in where["mongo"]
    assert where["flower"] == f"http://127.0.0.1:{flower}"
    assert where["metrics"] == f"http://127.0.0.1:{metrics}/metrics"
    assert set(where) == {"redis", "mongo", "kafka", "flower", "metrics"}


def test_the_command_provider_keeps_urls_off_command_lines_logs_and_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dm.control import Control
    from dm.errors import ConfigError
    from dm.providers.command import CommandProvider

    settings = Settings(
        home=tmp_path / "home",
        redis_url=f"redis://:{REDIS_PW}@10.0.0.5:6379/0",
        mongo_url=f"mongodb://dm:{MONGO_PW}@10.0.0.5/?authSource=admin",
        provider="command",
    )
    out = tmp_path / "stdin.txt"
    record = f"{{python}} -c 'import sys; open(sys.argv[1], \"w\").write(sys.stdin.read())' {out} {{env_file}}"
    provider = CommandProvider()
    caplog.set_level("DEBUG")

    # a start command gets the settings on its stdin and in a 0600 file, never in its argv
    pid = provider.start(Control(settings.with_(node_start_command=record)), "7", 1.0, 512.0, "h")
    wait_for(lambda: provider.running["7"].poll() is not None, 30, what="the start command to end")
    assert provider.running["7"].returncode == 0
    lines = out.read_text().splitlines()
    assert f"DM_REDIS_URL={settings.redis_url}" in lines and f"DM_MONGO_URL={settings.mongo_url}" in lines
    assert any(line.startswith("DM_SIGNING_KEY=") for line in lines)
    env_file = settings.home / "nodes" / "node-7.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and env_file.read_text().splitlines() == lines
    assert pid > 0
    # a template that would put a password on a command line is refused; a failing one says so without it
    for template, message in [
        ("ssh {host} dm node --redis {redis_url}", "puts {redis_url} on the node's command line"),
        (f"/nonexistent/dm-node {settings.redis_url}", "cannot run DM_NODE_START_COMMAND: /nonexistent/dm-node"),
    ]:
        with pytest.raises(ConfigError, match="DM_NODE_START_COMMAND") as caught:
            provider.start(Control(settings.with_(node_start_command=template)), "8", 1.0, 512.0, "h")
        assert message in str(caught.value)
        assert REDIS_PW not in str(caught.value) and MONGO_PW not in str(caught.value)
    stop = settings.with_(node_stop_command=f"/nonexistent/stop {settings.redis_url}")
    assert provider.stop(Control(stop), {"_id": "7"}) is False
    assert caplog.records and not [
        r for r in caplog.records if REDIS_PW in r.getMessage() or MONGO_PW in r.getMessage()
    ]


def test_largest_node_per_provider(stack: Any, tmp_path: Path) -> None:
    from dm.capacity import check_demand, largest_node
    from dm.errors import NoCapacity
    from dm.models import Demand

    system = System(stack.redis_url, stack.mongo_url, tmp_path / "home", node_cpus=2, node_memory=2048)
    try:
        registry, settings = system.ctl.registry, system.settings
        static, command = settings.with_(provider="static"), settings.with_(provider="command")
        assert largest_node(settings, registry) == (2, 2048)
        assert largest_node(static, registry) is None  # unknown: nothing is refused
        check_demand("x", Demand(cpu=500, memory=1), static, registry)
        registry.upsert_node("1", state="up", cpus=8, memory=1024)
        registry.upsert_node("2", state="stopped", cpus=64, memory=65536)  # gone: not counted
        assert largest_node(static, registry) == (8, 1024)
        assert largest_node(command, registry) == (8, 1024)
        assert largest_node(settings, registry) == (2, 2048)  # local: the size it starts
        check_demand("x", Demand(cpu=6.4, memory=800), static, registry)  # 80% of the largest fits
        check_demand("x", Demand(cpu=1, memory=1600), command, registry)  # on a node of the configured size
        with pytest.raises(NoCapacity, match=r"x declares 900 MiB, but the largest node provider 'static' has"):
            check_demand("x", Demand(cpu=1, memory=900), static, registry)
    finally:
        system.stop()
