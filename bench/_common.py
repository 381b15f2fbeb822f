"""Shared pieces of the benchmarks: a private stack and process harness, figures, the docs page.

Kept light at import (stdlib and Celery only): the baseline Celery worker of the
benchmarks is ``celery -A bench._common:baseline_app worker``, and what this module
imports is part of that worker's memory.

- :class:`Harness` starts an embedded stack (no Kafka) in a temp dir, points ``DM_*``
  at it with a fresh database, spawns processes in their own sessions, and stops every
  process by its PID (then the stack) on exit, error or not.
- :data:`baseline_app`: a minimal Celery app (JSON, Redis), the yardstick for dm's paths;
  its ``bench.floor_insert`` and ``bench.floor_start`` tasks chain the architecture's
  floor of a deploy (two bare hops, one raw insert, one ``Popen``).
- :func:`write_section` replaces one benchmark's section of ``docs/benchmarks-core.md``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
#: the machine's 1-minute load average when the benchmark started (other work shows here)
LOAD_AT_START = os.getloadavg()[0]
DOC = ROOT / "docs" / "benchmarks.md"
#: the queue of the baseline worker
BASELINE_QUEUE = "bench.baseline"
#: env var that gives the baseline worker its Redis
BASELINE_REDIS_ENV = "BENCH_REDIS_URL"
#: the queue of the floor's first bare worker (the one that inserts; the second is the baseline's)
FLOOR_QUEUE = "bench.floor"
#: the collection the floor inserts into, in the run's database (no index but ``_id``)
FLOOR_COLLECTION = "bench_floor"

# -- the baseline: a bare Celery app --------------------------------------------------

baseline_app = Celery(
    "bench_baseline",
    broker=os.environ.get(BASELINE_REDIS_ENV),
    backend=os.environ.get(BASELINE_REDIS_ENV),
)
baseline_app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=BASELINE_QUEUE,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
#: processes the baseline task started in this worker (killed and reaped by ``bench.reap``)
_children: list[subprocess.Popen[bytes]] = []


@baseline_app.task(name="bench.popen")
def popen(command: list[str]) -> int:
    """Start ``command`` and return its pid: the least a node must do to run something."""
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    _children.append(proc)
    return proc.pid


@baseline_app.task(name="bench.reap")
def reap() -> int:
    """Kill and reap what ``bench.popen`` started; returns how many."""
    for proc in _children:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    count = len(_children)
    _children.clear()
    return count


_floor_collection: Any = None


@baseline_app.task(name="bench.floor_insert")
def floor_insert(doc: dict[str, Any], command: list[str]) -> dict[str, Any]:
    """The floor's first hop: one raw ``insert_one`` of ``doc``, then ``floor_start`` sent to the
    baseline worker's queue. Returns its stamps and the id of the task it sent."""
    global _floor_collection
    start = time.time()
    if _floor_collection is None:  # imported here: the idle baseline worker never loads pymongo
        import pymongo

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(os.environ["DM_MONGO_URL"])
        _floor_collection = client[os.environ["DM_DATABASE"]][FLOOR_COLLECTION]
    _floor_collection.insert_one(doc)
    inserted = time.time()
    sent = floor_start.apply_async((command,), queue=BASELINE_QUEUE)
    return {"start": start, "inserted": inserted, "next": sent.id}


@baseline_app.task(name="bench.floor_start")
def floor_start(command: list[str]) -> dict[str, float]:
    """The floor's second hop: ``Popen`` of ``command``; returns its stamps (the last one is the
    floor's ``running``) and the pid."""
    start = time.time()
    pid = popen(command)
    return {"start": start, "running": time.time(), "pid": pid}


def baseline_worker_cmd(concurrency: int = 4, name: str = "", queue: str = BASELINE_QUEUE) -> list[str]:
    """A bare worker of :data:`baseline_app`: threads pool, its own queue, like a node's flags."""
    name = name or f"baseline-{uuid.uuid4().hex[:6]}"
    return [
        sys.executable, "-m", "celery", "-A", "bench._common:baseline_app", "worker",
        "-Q", queue, "-P", "threads", "-c", str(concurrency),
        "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "WARNING",
    ]  # fmt: skip


# -- the harness ----------------------------------------------------------------------


class Harness:
    """A private embedded stack and the processes of one benchmark run, all stopped by PID."""

    def __init__(self, name: str, **settings: object) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"dm-bench-{name}-"))
        self.home = self.dir / "home"
        self.database = f"bench_{name}_{uuid.uuid4().hex[:8]}"
        self.settings = {f"DM_{k.upper()}": str(v) for k, v in settings.items()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stack: Any = None
        self.env: dict[str, str] = {}
        #: set when the run ends: background threads of the benchmark stop on it
        self.stopping = threading.Event()

    def __enter__(self) -> Harness:
        from dm.embedded import EmbeddedStack

        try:
            self.stack = EmbeddedStack(self.dir / "stack", kafka=False).start()
            self.home.mkdir(parents=True, exist_ok=True)
            dm_env = {
                **self.settings,
                "DM_REDIS_URL": self.stack.redis_url,
                "DM_MONGO_URL": self.stack.mongo_url,
                "DM_DATABASE": self.database,
                "DM_HOME": str(self.home),
                BASELINE_REDIS_ENV: self.stack.redis_url,
            }
            # this process too: dm.app reads its settings from the environment on import
            os.environ.update(dm_env)
            for key in ("DM_KAFKA_BOOTSTRAP",):
                os.environ.pop(key, None)
            baseline_app.conf.broker_url = baseline_app.conf.result_backend = self.stack.redis_url
            pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            self.env = {**os.environ, **dm_env, "PYTHONPATH": pythonpath}
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.close()

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session, output to ``<dir>/logs/<name>.log``."""
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def log(self, name: str, lines: int = 15) -> str:
        from dm.embedded import log_tail

        return log_tail(self.dir / "logs" / f"{name}.log", lines=lines)

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)}")

    def stop(self, name: str, timeout: float = 15.0) -> None:
        from dm.embedded import stop_pid

        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_pid(proc.pid, timeout)
            proc.poll()

    def close(self) -> None:
        """Stop every process (the last started first), drop the database, stop the stack."""
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except Exception as exc:  # keep going: the rest must stop too
                print(f"warning: stopping {name}: {exc}", file=sys.stderr)
        if self.stack is not None:
            try:
                import pymongo

                client: pymongo.MongoClient[dict[str, Any]]
                with pymongo.MongoClient(self.stack.mongo_url, serverSelectionTimeoutMS=3000) as client:
                    client.drop_database(self.database)
            except Exception:
                pass  # the stack goes away next anyway
            self.stack.stop()
            self.stack = None
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


# -- figures --------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def machine() -> str:
    model = ""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = found.group(1).strip() if found else ""
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    cores = os.cpu_count() or 0
    cpu = model or platform.processor() or platform.machine()
    return f"{cores} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(rel), *sys.argv[1:]])


# -- the docs page --------------------------------------------------------------------

_HEADER = """# Benchmarks

Each section is written by its script in `bench/` (the section between its markers is
replaced on every run). Every script starts its own embedded stack (Redis, SecantusDB;
no Kafka) in a temp dir, uses a fresh database, and stops every process it started by
its PID. Each section's header names what its figures are measured against: a baseline
measured in the same run, or none (then peers' figures are given as prose).
"""
#: the order of the sections on the page
#: the order of the sections; any other section found in the page is kept after them
SECTIONS = ("deploy_latency", "placement", "placement_1000", "node_idle", "failover", "failover_outages",
            "failover_sentinel", "bridge", "scale", "registry_costs")  # fmt: skip


def write_section(name: str, title: str, body: str) -> Path:
    """Replace (or add) the section ``name`` of docs/benchmarks.md; returns the path."""
    text = DOC.read_text() if DOC.exists() else _HEADER
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = (
        f"{begin}\n## {title}\n\n"
        f"Run on {date.today().isoformat()}; machine: {machine()}; 1-min load average "
        f"{LOAD_AT_START:.2f} at the start (before the run's own processes).\n\n"
        f"```sh\n{command_line()}\n```\n\n{body.strip()}\n{end}"
    )
    sections = {m.group(1): m.group(0) for m in re.finditer(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", text, re.S)}
    sections[name] = block
    head = re.split(r"<!-- bench:", text, maxsplit=1)[0].rstrip() + "\n"
    # hand-written text after the last section (findings, notes) is kept as it is
    ends = list(re.finditer(r"<!-- /bench:\w+ -->", text))
    tail = text[ends[-1].end() :].strip() if ends else ""
    ordered = [sections[n] for n in SECTIONS if n in sections]
    ordered += [b for n, b in sections.items() if n not in SECTIONS]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(head + "\n" + "\n\n".join(ordered) + "\n" + (f"\n{tail}\n" if tail else ""))
    return DOC
