"""Retention (dm/retention.py) and a node's housekeeping (workers/housekeeping.py): finished
deployments, their events and gone nodes forgotten after DM_RETENTION, logs rotated by size,
and what finished deployments left on a node pruned."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dm import fleet, retention
from dm import keys as k
from dm.errors import BadPackage
from dm.lifecycle import event_of
from dm.models import ACTIVE_STATES, FINAL_STATES, LOST, PENDING, STOPPING, DeployRequest
from dm.package import load_spec
from dm.settings import Settings
from tests.system import EXAMPLES, System, wait_for
from workers import housekeeping

DAY = 86400.0


def _record(system: System, state: str, age: float, seq: list[int], made: float) -> str:
    """A deployment in ``state`` made ``made`` seconds ago and last changed ``age`` seconds ago,
    with two events."""
    ctl = system.ctl
    doc = ctl.registry.new_deployment(DeployRequest("hello"), ctl.registry.get_algorithm("hello"))
    now = time.time()
    doc.update(state=state, created_at=now - made, updated_at=now - age, node="1" if state in ACTIVE_STATES else None)
    ctl.registry.deployments.insert_one(doc)
    for rev in (0, 1):
        seq[0] += 1
        ctl.registry.events.insert_one({"_id": seq[0], **event_of({**doc, "rev": rev})})
    return str(doc["_id"])


def _everything(system: System, retention_s: float) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Old and recent deployments of every state, and old and recent nodes of every state."""
    seq = [0]
    states = [*FINAL_STATES, *ACTIVE_STATES, PENDING, LOST, STOPPING]
    old = {s: [_record(system, s, retention_s + 60, seq, made=retention_s + 120)] for s in states}
    # recent: changed within the retention, though made long before it (a long run that ended lately)
    recent = {s: [_record(system, s, retention_s / 2, seq, made=3 * retention_s)] for s in states}
    return old, recent


def _node(system: System, node_id: str, state: str, age: float) -> None:
    ctl = system.ctl
    fleet.register_node(ctl.redis, node_id, cpus=1, memory=1024, state=state)
    ctl.redis.hset(k.NODE.format(node_id), "ts", time.time() - age)
    ctl.registry.upsert_node(node_id, state=state, cpus=1, memory=1024)
    ctl.registry.nodes.update_one({"_id": node_id}, {"$set": {"updated_at": time.time() - age}})


def test_a_sweep_forgets_old_finished_deployments_and_gone_nodes_and_keeps_every_active_one(
    stack: Any, tmp_path: Path
) -> None:
    # Given deployments of every state, old and recent, with their events, and nodes
    system = System(stack.redis_url, stack.mongo_url, tmp_path / "home", retention=DAY)
    try:
        system.add_examples("hello")
        old, recent = _everything(system, DAY)
        for node_id, state, age in [("1", "up", 9 * DAY), ("2", "dead", 8 * DAY), ("3", "stopped", 9 * DAY),
                                    ("4", "dead", DAY / 2)]:  # fmt: skip
            _node(system, node_id, state, age)
        ctl = system.ctl

        # When the retention sweep runs
        done = retention.sweep(ctl)

        # Then the old finished ones are gone, events and all; every active one and every recent one stays
        gone = {d for s in FINAL_STATES for d in old[s]}
        kept = {d for s, ids in old.items() if s not in FINAL_STATES for d in ids} | {
            d for ids in recent.values() for d in ids
        }
        present = {d["_id"] for d in ctl.registry.deployments.find({}, {"_id": 1})}
        assert present == kept
        with_events = set(ctl.registry.events.distinct("deployment_id"))
        assert with_events == kept
        assert done["deployments"] == len(gone) == 3 and done["events"] == 6
        # and the nodes gone for longer than the retention leave the registry and the fleet view
        assert sorted(done["nodes"]) == ["2", "3"]
        assert sorted(n["_id"] for n in ctl.registry.list_nodes()) == ["1", "4"]
        assert fleet.node_ids(ctl.redis) == ["1", "4"]
        assert not ctl.redis.exists(k.NODE.format("2"))
        # a second sweep finds nothing more
        assert retention.sweep(ctl) == {"deployments": 0, "events": 0, "nodes": []}
        # the query is indexed
        plan = ctl.registry.deployments.find({"state": "succeeded", "updated_at": {"$lt": 0}}).explain()
        assert "state_1_updated_at_1" in str(plan["queryPlanner"]["winningPlan"])
    finally:
        system.stop()


def test_beat_runs_the_sweep(make_system: Any) -> None:
    # Given a control worker and beat with a short retention and sweep interval
    system = make_system(nodes=0, retention="30s", retention_interval=0.5)
    system.add_examples("hello")
    seq = [1000]
    finished = _record(system, "succeeded", 60, seq, made=120)
    running = _record(system, "running", 60, seq, made=120)

    # Then the finished one disappears on its own; the running one stays
    wait_for(lambda: system.ctl.registry.deployments.count_documents({"_id": finished}) == 0, 30,
             what="the finished deployment swept")  # fmt: skip
    assert system.ctl.registry.get_deployment(running)["state"] == "running"


# --- a node's housekeeping: unit ---------------------------------------------------


def test_a_log_past_its_cap_is_rotated_and_the_writer_goes_on_in_the_emptied_file(tmp_path: Path) -> None:
    log = tmp_path / "d1.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as the supervisor opens it
    try:
        generations = []
        for i in range(5):
            os.write(fd, f"{i}".encode() * 5000)
            assert housekeeping.rotate(log, max_size=4096, keep=3)
            generations.append(str(i))
        assert not housekeeping.rotate(log, max_size=4096, keep=3)  # nothing past the cap now
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert log.read_bytes() == b"after"  # O_APPEND: at the start of the emptied file, no hole
    assert [(log.with_name(f"d1.log.{n}")).read_bytes()[:1] for n in (1, 2, 3)] == [b"4", b"3", b"2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1.log", "d1.log.1", "d1.log.2", "d1.log.3"]
    assert oct(log.with_name("d1.log.1").stat().st_mode & 0o777) == oct(0o600)
    # a lower keep drops the copies past it
    log.write_bytes(b"x" * 5000)
    housekeeping.rotate(log, max_size=4096, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1.log", "d1.log.1"]


def test_log_limits_come_from_the_package_or_the_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, log_max_size=1 << 20, log_keep=2)
    assert housekeeping.log_limits(None, settings) == (1 << 20, 2)
    assert housekeeping.log_limits(EXAMPLES / "hello", settings) == (1 << 20, 2)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "main.py").write_text("")
    toml = 'name = "x"\nversion = "1"\ncommand = ["python", "main.py"]\n[logs]\nmax_size = 8192\nkeep = 5\n'
    (pkg / "algorithm.toml").write_text(toml)
    load_spec(pkg)  # valid
    assert housekeeping.log_limits(pkg, settings) == (8192, 5)
    (pkg / "algorithm.toml").write_text(toml.replace("8192", "10"))
    with pytest.raises(BadPackage, match=r"'logs.max_size' must be a whole number of bytes from 4096"):
        load_spec(pkg)


def test_prune_removes_what_finished_deployments_left_and_keeps_the_rest(tmp_path: Path) -> None:
    now = time.time()
    old = now - 8 * DAY
    home = tmp_path
    made: dict[str, Path] = {}
    for name, kind, age in [
        ("logs/done.log", "file", old), ("logs/done.log.1", "file", old), ("logs/elsewhere.log", "file", old),
        ("logs/fresh.log", "file", now), ("work/done", "dir", old), ("work/elsewhere", "dir", old),
        ("work/fresh", "dir", now), ("cache/aaa", "dir", old), ("cache/bbb", "dir", old), ("cache/ccc", "dir", now),
        ("cache/.aaa.tmp1", "dir", now - 2 * 3600),
    ]:  # fmt: skip
        path = home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if kind == "dir" else path.write_text("x")
        os.utime(path, (age, age))
        made[name] = path
    asked: list[list[str]] = []

    def still_active(ids: list[str]) -> set[str]:
        asked.append(ids)
        return {"elsewhere"} & set(ids)  # running on another node that shares this DM_HOME

    done = housekeeping.prune(home, 7 * DAY, still_active, lambda shas: {"bbb"} & set(shas), now)

    assert asked == [["done", "elsewhere"]]  # only the old ones are asked about
    assert done == {"logs": 2, "work": 1, "cache": 2}
    left = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert left == ["cache", "cache/bbb", "cache/ccc", "logs", "logs/elsewhere.log", "logs/fresh.log", "work",
                    "work/elsewhere", "work/fresh"]  # fmt: skip


# --- against a real node ------------------------------------------------------------


def test_a_running_algorithms_log_is_rotated_at_its_cap(make_system: Any, tmp_path: Path) -> None:
    # Given an algorithm that writes fast, with a 4 KiB log cap and 2 copies kept
    pkg = tmp_path / "chatty"
    pkg.mkdir()
    (pkg / "main.py").write_text("import time\nwhile True:\n    print('x' * 99, flush=True)\n    time.sleep(0.002)\n")
    (pkg / "algorithm.toml").write_text(
        'name = "chatty"\nversion = "1"\ncommand = ["python", "main.py"]\ncpu = 0.05\nmemory = 32\n'
        "[logs]\nmax_size = 4096\nkeep = 2\n"
    )
    system = make_system(nodes=1)
    system.add_algorithm(pkg)

    # When it runs for a while
    dep = system.deploy("chatty")
    running = system.wait_state(dep["id"], "running", timeout=60)
    log = Path(running["log"])

    # Then its log is rotated: two copies kept, and the current log stays near the cap
    wait_for(lambda: log.with_name(log.name + ".2").exists(), 60, what="the log rotated twice")
    assert log.with_name(log.name + ".1").stat().st_size > 4096
    assert not log.with_name(log.name + ".3").exists()
    system.dm("stop", dep["id"])
    system.wait_state(dep["id"], "stopped", timeout=60)


def test_a_nodes_pruning_asks_the_registry_what_is_finished(stack: Any, tmp_path: Path) -> None:
    # Given a node home with old files of a finished deployment and of one still running elsewhere
    system = System(stack.redis_url, stack.mongo_url, tmp_path / "home", retention=DAY)
    try:
        system.add_examples("hello")
        seq = [5000]
        finished = _record(system, "succeeded", 2 * DAY, seq, made=3 * DAY)
        running = _record(system, "running", 2 * DAY, seq, made=3 * DAY)
        sha = system.ctl.registry.get_deployment(running)["sha256"]
        home = system.home
        old = time.time() - 2 * DAY
        for path in [home / "logs" / f"{finished}.log", home / "logs" / f"{running}.log"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        for path in [home / "work" / finished, home / "work" / running, home / "cache" / sha, home / "cache" / "0ld"]:
            path.mkdir(parents=True)
        for path in home.rglob("*"):
            os.utime(path, (old, old))

        # what the housekeeper reads of a supervisor: nothing runs on this node
        sup = SimpleNamespace(node_id="9", ctl=system.ctl, procs={}, logs=home / "logs", home=home)

        # When the node prunes
        done = housekeeping.Housekeeper(sup, system.settings).prune_once()

        # Then only what the finished deployment left, and the unused package, are gone
        assert done == {"logs": 1, "work": 1, "cache": 1}
        assert sorted(p.name for p in (home / "logs").iterdir()) == [f"{running}.log"]
        assert sorted(p.name for p in (home / "work").iterdir()) == [running]
        assert sorted(p.name for p in (home / "cache").iterdir()) == [sha]
    finally:
        system.stop()
