"""Scale: the control plane with N hollow nodes (workers/hollow.py) and D deployments.

For each (N, D), a private embedded stack, a real control worker (``celery -A dm worker
-Q dm.control``, as tests/system.py starts it), and one hollow process of N nodes
(``dm node --hollow N``), each node 16 cores / 64 GiB. No beat: this process runs the
reconcilers itself every 0.5 s, each pass timed: the failure detector (``dm.detect``) in a
thread of its own, placement and scaling (``dm.replace``, ``dm.scale``) in another, as beat's
separate tasks run on the control worker's threads. Then:

- D background deployments, recorded ``running`` in bulk (documents as the registry makes
  them, with their events, and their allocations in Redis) on all nodes but two, and 50
  and 500 on the two victims (when D allows);
- quiet reconciler passes: p50 / p99 over the passes of each (detect, replace, scale) while
  nothing changes;
- ``dm status --json`` and ``dm deployments --json`` (first page) as a user runs them (a new
  process each: interpreter start included), and the functions behind them in-process;
- failover: the victim with 50 deployments killed (its presence connection and lease stop,
  as ``kill -9``; through ``dm:hollow:kill``): seconds from the kill until it is dead in
  the registry, and until all its deployments run elsewhere; then the one with 500; then
  a tenth of the nodes at once; each process's cpu seconds during the failover of 500;
- a burst of ``--burst`` deploys through ``deploy.delay`` (the control worker places each,
  the hollow node reports ``running`` through its outbox): deploys/s (requests sent until
  the last result) and deploy -> running p50 / p99 (send until the ``running`` event);
  the reconciler passes during the burst (p50 / p99);
- the control worker's RSS, Redis memory, the registry's size.

Each row is shown beside the N=50 row of the same run (same D). Goals are those of issue
14 (at N=1000, D=50000). ``--quick`` runs N=50, D=1000 with a burst of 200 (under 2 minutes).

    python bench/scale.py [--quick] [--json] [--nodes 50,200,1000] [--deployments 1000,10000] [--burst 500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import Harness, percentile, table, verdict, wait_for, write_section

ALGORITHM = "hollowbench"
#: deployments on the two failover victims
VICTIMS = (50, 500)
HEARTBEAT_EVERY = 0.5
#: seconds the tenth of the nodes killed at once is waited for (the goal is 30 s for 5,000)
TENTH_TIMEOUT = 600.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=50, D=1000, burst 200 (under 2 minutes)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--nodes", default="50,200", help="hollow node counts, comma-separated (default 50,200)")
    p.add_argument("--deployments", default="1000", help="background deployment counts (default 1000)")
    p.add_argument("--burst", type=int, default=500, help="deploys in the timed burst (default 500)")
    p.add_argument("--passes", type=int, default=40, help="quiet heartbeat passes timed (default 40)")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.deployments, args.burst, args.passes = "50", "1000", 200, 30
    return args


class Beat(threading.Thread):
    """Reconcilers every 0.5 s in this process, each pass timed: the failure detector in a
    thread of its own, the others in another, as beat's separate tasks run on the control
    worker's threads (a long placement pass never delays the detector)."""

    def __init__(self, ctl: Any, stopping: threading.Event, which: tuple[str, ...] = ("detect",)) -> None:
        super().__init__(name=f"bench-beat-{'-'.join(which)}", daemon=True)
        self.ctl, self.stopping, self.which = ctl, stopping, which
        self.passes: list[float] = []
        self.errors = 0

    def run(self) -> None:
        from dm import reconcilers

        while not self.stopping.is_set():
            started = time.perf_counter()
            for name in self.which:
                t0 = time.perf_counter()
                try:
                    getattr(reconcilers, name).run(self.ctl.ports)
                    self.passes.append(time.perf_counter() - t0)
                except Exception as exc:  # keep beating: a pass cut short is counted and shown
                    self.errors += 1
                    print(f"{name} pass failed: {exc!r}", file=sys.stderr)
            self.stopping.wait(max(0.0, HEARTBEAT_EVERY - (time.perf_counter() - started)))


def add_algorithm(h: Harness, ctl: Any) -> dict[str, Any]:
    from dm.package import load_spec, pack

    directory = h.dir / ALGORITHM
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "algorithm.toml").write_text(
        f'name = "{ALGORITHM}"\nversion = "1.0.0"\ncommand = ["/bin/false"]\ncpu = 0.001\nmemory = 1\n'
        '[restart]\npolicy = "never"\n'
    )
    archive, sha = pack(directory)
    return dict(ctl.registry.add_algorithm(load_spec(directory), archive, sha))


def seed(ctl: Any, algorithm: dict[str, Any], counts: dict[str, int]) -> tuple[float, int]:
    """Record deployments ``running`` on nodes in bulk, as the registry records them; seconds
    taken, and the events they carry (the relay copies them)."""
    from dm import fleet
    from dm.lifecycle import event_of
    from dm.models import Demand, DeployRequest
    from workers.hollow import FAKE_PID_BASE

    started = time.perf_counter()
    demand = Demand.from_dict(algorithm["spec"]["demand"])
    docs: list[dict[str, Any]] = []
    events = 0

    def flush() -> None:
        if docs:
            ctl.registry.deployments.insert_many(docs, ordered=False)
            pipe = ctl.redis.pipeline(transaction=False)
            for doc in docs:
                fleet.allocate(ctl.redis, doc["node"], doc["_id"], demand, pipe=pipe, generation=doc["generation"])
            pipe.execute()
            docs.clear()

    for node_id, count in counts.items():
        for _ in range(count):
            doc = ctl.registry.new_deployment(DeployRequest(algorithm=ALGORITHM), algorithm, node=node_id)
            doc.update(state="running", rev=2, pid=FAKE_PID_BASE - 1, updated_at=time.time(), reason="seeded")
            doc["history"].append(event_of(doc, "scheduled"))
            events += len(doc["history"])  # pending, scheduled, running
            docs.append(doc)
            if len(docs) >= 1000:
                flush()
    flush()
    return time.perf_counter() - started, events


def timed_cli(h: Harness, *args: str, runs: int = 3) -> tuple[float, int]:
    """Median wall seconds of ``dm ARGS`` in a new process, and the bytes it printed."""
    times, size = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "dm", *args], env=h.env, capture_output=True, timeout=120)
        times.append(time.perf_counter() - started)
        if out.returncode != 0:
            raise RuntimeError(f"dm {' '.join(args)} failed: {out.stderr.decode()[-500:]}")
        size = len(out.stdout)
    return sorted(times)[len(times) // 2], size


def timed(fn: Any, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def failover(ctl: Any, victims: list[str], timeout: float = 180.0) -> dict[str, float]:
    """Kill hollow nodes at once; seconds until all are dead in the registry and until all
    their deployments run elsewhere.

    Followed by their events (the relay's copies, read by number from the mark at the kill:
    each poll costs what happened since the last), not by querying the deployments: the
    registry (SecantusDB) reads every document a query matches before it applies a limit, so
    a poll of "any still scheduled?" read all thousands of them five times a second and took
    the registry's time from the failover it measured. Once the events show every one
    running on another node, the deployments themselves are read (by id, in chunks) to
    confirm it; the time is the poll's that saw it in the events."""
    from dm.registry.events import EventCursor
    from workers.hollow import KILL_KEY

    dep_ids = [d["_id"] for d in ctl.registry.deployments.find(
        {"node": {"$in": victims}, "state": "running"}, {"_id": 1})]  # fmt: skip
    deps = ctl.registry.deployments
    out, theirs = set(victims), set(dep_ids)
    cursor = EventCursor(ctl.registry)
    cursor.last = ctl.registry.events_mark()
    newest: dict[str, int] = {}  # deployment -> rev of its newest event read
    waiting = set(dep_ids)  # not yet running elsewhere, as their events show
    killed, killed_wall = time.monotonic(), time.time()
    ctl.redis.sadd(KILL_KEY, *victims)
    dead_at = moved_at = None
    while moved_at is None and time.monotonic() - killed < timeout:
        now = time.monotonic()
        if dead_at is None and ctl.registry.nodes.count_documents({"_id": {"$in": victims}, "state": "dead"}) == len(
            victims
        ):
            dead_at = now
        while events := cursor.poll():
            for e in events:
                dep, rev = e["deployment_id"], int(e["rev"])
                if dep in theirs and rev >= newest.get(dep, -1):
                    newest[dep] = rev
                    if e["state"] == "running" and e.get("node") not in out:
                        waiting.discard(dep)
                    else:
                        waiting.add(dep)
        if dead_at is not None and not waiting and running_elsewhere(deps, dep_ids, victims) == len(dep_ids):
            moved_at = now
        time.sleep(0.2)
    if dead_at is None or moved_at is None:  # figures of what it reached, not a lost run
        running = running_elsewhere(deps, dep_ids, victims)
        return {"dead_s": (dead_at - killed) if dead_at else float("nan"), "all_running_s": float("nan"),
                "after_dead_s": float("nan"), "moved": len(dep_ids), "nodes": len(victims),
                "running_after_timeout": running, "timeout_s": timeout}  # fmt: skip
    return {"dead_s": dead_at - killed, "all_running_s": moved_at - killed, "after_dead_s": moved_at - dead_at,
            "moved": len(dep_ids), "nodes": len(victims), "retried": retried(deps, dep_ids, killed_wall)}  # fmt: skip


def retried(deps: Any, dep_ids: list[str], since: float) -> int:
    """How many of ``dep_ids`` were placed more than once since ``since`` (their new node did
    not report them running within the start timeout, or another move took them)."""
    from dm.registry.base import find_in

    def placed(doc: dict[str, Any]) -> int:
        return sum(1 for e in doc.get("history") or [] if e.get("state") == "scheduled" and e["time"] >= since)

    return sum(1 for d in find_in(deps, dep_ids, {"history.state": 1, "history.time": 1}) if placed(d) > 1)


def running_elsewhere(deps: Any, dep_ids: list[str], victims: list[str]) -> int:
    """How many of ``dep_ids`` run on a node not among ``victims``: read by id in chunks (one
    ``$in`` of thousands of ids outlasted the client's 10 s timeout on SecantusDB)."""
    from dm.registry.base import find_in

    return sum(1 for d in find_in(deps, dep_ids, {"state": 1, "node": 1})
               if d["state"] == "running" and d.get("node") not in victims)  # fmt: skip


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process (and its children, but for this one's) has used so far."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            kids = psutil.Process(pid).children(recursive=True) if pid != os.getpid() else []
            procs = [psutil.Process(pid), *kids]
        except psutil.Error:
            continue
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        out[name] = total
    return out


def one(nodes: int, deployments: int, burst: int, passes: int) -> dict[str, Any]:
    import psutil
    import pymongo

    from dm.control import Control
    from dm.settings import Settings
    from dm.status import deployment_counts, list_deployments, node_rows, recent_events

    row: dict[str, Any] = {"nodes": nodes, "deployments": deployments, "burst": burst}
    with Harness("scale", provider="static") as h:
        from dm.app import app
        from tests.system import forget_connections

        forget_connections()  # a new stack for each row: the Celery app connects anew
        app.conf.broker_url = app.conf.result_backend = h.stack.redis_url
        ctl = Control(Settings.from_env())
        ctl.redis.flushdb()
        ctl.registry.ensure_indexes()
        algorithm = add_algorithm(h, ctl)
        control = h.spawn(
            "control",
            [sys.executable, "-m", "celery", "-A", "dm", "worker", "-Q", "dm.control", "-P", "threads", "-c", "8",
             "-n", "control-bench@%h", "--without-gossip", "--without-mingle", "-l", "WARNING"],
        )  # fmt: skip
        started = time.monotonic()
        hollow = h.spawn("hollow", [sys.executable, "-m", "dm", "node", "--hollow", str(nodes)])
        wait_for(lambda: ctl.registry.nodes.count_documents({"state": "up"}) >= nodes, 300, f"{nodes} nodes up", 0.5)
        row["nodes_up_s"] = round(time.monotonic() - started, 1)
        h.check_alive()
        ids = sorted((n["_id"] for n in ctl.registry.nodes.find({"state": "up"}, {"_id": 1})), key=int)
        victims = [ids[0], ids[1]] if deployments >= sum(VICTIMS) + 1 and nodes > 3 else []
        others = [n for n in ids if n not in victims]
        counts = dict.fromkeys(others, 0)
        rest = deployments - (sum(VICTIMS) if victims else 0)
        for i in range(rest):
            counts[others[i % len(others)]] += 1
        counts.update(zip(victims, VICTIMS, strict=False))
        seed_s, seeded_events = seed(ctl, algorithm, counts)
        row["seed_s"] = round(seed_s, 1)
        # the relay copies the seeded deployments' events (three each) as it would have as they
        # happened: measured once it has, not while it holds the registry
        t0 = time.monotonic()
        # (all of them: waiting for two of each three left the relay copying the rest, at a core
        # of the registry, through the quiet passes)
        wait_for(lambda: ctl.registry.events_mark() >= seeded_events, 1800, "the relay to copy the events", 1.0)
        row["relay_catchup_s"] = round(time.monotonic() - t0, 1)

        # quiet passes (nothing changes), then the beat for the rest of the run
        from dm import reconcilers

        reconcilers.run_all(ctl.ports)  # the first pass in a new Redis rebuilds the allocations: not a quiet one
        quiet = []  # each reconciler's pass timed on its own, as beat runs them
        for _ in range(passes):
            for name in ("detect", "replace", "scale"):
                t0 = time.perf_counter()
                getattr(reconcilers, name).run(ctl.ports)
                quiet.append(time.perf_counter() - t0)
            time.sleep(0.2)
        row["pass_p50_ms"] = round(percentile(quiet, 50) * 1000, 1)
        row["pass_p99_ms"] = round(percentile(quiet, 99) * 1000, 1)

        row["status_cli_s"], row["status_bytes"] = timed_cli(h, "status", "--json")
        row["deployments_cli_s"], row["deployments_bytes"] = timed_cli(h, "deployments", "--json")
        row["status_fn_s"] = timed(lambda: (node_rows(ctl), deployment_counts(ctl), recent_events(ctl, 10)))
        row["deployments_fn_s"] = timed(lambda: list_deployments(ctl))

        beat = Beat(ctl, h.stopping)
        placer = Beat(ctl, h.stopping, ("replace", "scale"))
        beat.start()
        placer.start()
        pids = {server.name: server.pid for server in h.stack.servers}
        pids |= {"control worker": control.pid, "hollow": hollow.pid}
        pids["benchmark (reconcilers, polling, sending)"] = os.getpid()
        for victim, count in zip(victims, VICTIMS, strict=False):
            before = cpu_seconds(pids)
            figures = failover(ctl, [victim])
            after = cpu_seconds(pids)
            row[f"failover{count}"] = {k: round(v, 2) for k, v in figures.items()}
            # where the time of the failover went: each process's cpu seconds meanwhile
            row[f"failover{count}"]["cpu_s"] = {k: round(after[k] - before[k], 1) for k in after if k in before}
        # a tenth of the nodes at once (not the victims, which are dead already)
        tenth = others[-max(1, nodes // 10) :]
        row["failover_tenth"] = {k: round(v, 2) for k, v in failover(ctl, tenth, timeout=TENTH_TIMEOUT).items()}

        from dm.tasks import deploy

        deploy.delay(ALGORITHM).get(timeout=60)  # warm: connections, caches
        burst_from, placer_from = len(beat.passes), len(placer.passes)
        sent: list[tuple[float, Any]] = []
        before = cpu_seconds(pids)
        t0 = time.time()
        for _ in range(burst):
            sent.append((time.time(), deploy.delay(ALGORITHM)))
        results = [(at, res.get(timeout=300)) for at, res in sent]
        took = time.time() - t0
        after = cpu_seconds(pids)
        row["deploys_per_s"] = round(burst / took, 1)
        # where the burst's time went: each process's cpu seconds while the deploys were accepted
        row["burst_cpu_s"] = {k: round(after[k] - before[k], 1) for k in after if k in before}
        row["burst_s"] = round(took, 2)
        dep_ids = [r["id"] for _, r in results]
        wait_for(
            lambda: ctl.registry.deployments.count_documents({"_id": {"$in": dep_ids}, "state": "running"}) == burst,
            300,
            "the burst running",
            0.5,
        )
        burst_passes = beat.passes[burst_from:] + placer.passes[placer_from:]
        runs = {}
        for doc in ctl.registry.deployments.find({"_id": {"$in": dep_ids}}, {"history": 1}):
            runs[doc["_id"]] = min(e["time"] for e in doc["history"] if e["state"] == "running")
        latency = [runs[r["id"]] - at for at, r in results]
        row["run_p50_ms"] = round(percentile(latency, 50) * 1000, 1)
        row["run_p99_ms"] = round(percentile(latency, 99) * 1000, 1)

        row["burst_pass_p50_ms"] = round(percentile(burst_passes, 50) * 1000, 1) if burst_passes else None
        row["burst_pass_p99_ms"] = round(percentile(burst_passes, 99) * 1000, 1) if burst_passes else None
        row["beat_errors"] = beat.errors + placer.errors
        row["control_rss_mib"] = round(psutil.Process(control.pid).memory_info().rss / 2**20, 1)
        row["hollow_rss_mib"] = round(psutil.Process(hollow.pid).memory_info().rss / 2**20, 1)
        row["redis_mib"] = round(int(ctl.redis.info("memory")["used_memory"]) / 2**20, 1)
        # SecantusDB reads every document and index entry for it: longer than the registry's 10 s
        # socket timeout at D=50,000 on a slow machine, so a client of its own
        with pymongo.MongoClient(ctl.settings.mongo_url, socketTimeoutMS=120_000) as client:
            stats = client[ctl.settings.database].command("dbstats")
        row["registry_mib"] = round((stats.get("dataSize", 0) + stats.get("indexSize", 0)) / 2**20, 1)
        h.stopping.set()
        beat.join(10)
        placer.join(10)
        os.kill(hollow.pid, signal.SIGKILL)  # no handover of thousands of deployments at the end
    return row


def report(rows: list[dict[str, Any]]) -> str:
    base = {r["deployments"]: r for r in rows if r["nodes"] == 50}

    def rel(row: dict[str, Any], key: str) -> str:
        b = base.get(row["deployments"])
        value = row.get(key)
        if value is None:
            return "-"
        if b is None or row is b or not b.get(key):
            return f"{value}"
        return f"{value} ({value / b[key]:.2f}x)"

    def fo(row: dict[str, Any], key: str) -> str:
        f = row.get(key)
        if not f:
            return "-"
        what = f"{f['nodes']} nodes, {f['moved']} deployments: " if key == "failover_tenth" else ""
        if "running_after_timeout" in f:
            return f"{what}{f['running_after_timeout']} running elsewhere after {f['timeout_s']:.0f} s (not all)"
        again = f", {f['retried']} placed twice" if f.get("retried") else ""
        return f"{what}{f['all_running_s']:.2f} s ({f['after_dead_s']:.2f} after dead{again})"

    header = ["N / D", "quiet pass p50 / p99 ms", "pass in burst p99 ms", "deploys/s", "deploy->running p50 / p99 ms",
              "failover 50", "failover 500", "10% of nodes at once", "dm status s (fn)", "dm deployments s (fn)",
              "control RSS MiB", "hollow RSS MiB", "Redis MiB", "registry MiB"]  # fmt: skip
    lines = []
    for r in rows:
        lines.append([
            f"{r['nodes']} / {r['deployments']}",
            f"{rel(r, 'pass_p50_ms')} / {rel(r, 'pass_p99_ms')}",
            rel(r, "burst_pass_p99_ms"),
            rel(r, "deploys_per_s"),
            f"{rel(r, 'run_p50_ms')} / {r['run_p99_ms']}",
            fo(r, "failover50"),
            fo(r, "failover500"),
            fo(r, "failover_tenth"),
            f"{r['status_cli_s']:.2f} ({r['status_fn_s']:.3f})",
            f"{r['deployments_cli_s']:.2f} ({r['deployments_fn_s']:.3f})",
            r["control_rss_mib"],
            r["hollow_rss_mib"],
            r["redis_mib"],
            r["registry_mib"],
        ])  # fmt: skip
    goals = []
    big = [r for r in rows if r["nodes"] == max(x["nodes"] for x in rows)]
    for r in big:
        b = base.get(r["deployments"])
        fo500 = r.get("failover500")
        tenth = r["failover_tenth"]
        goals += [
            f"- N={r['nodes']}, D={r['deployments']}: reconciler pass p99 <= 50 ms: "
            f"**{verdict(r['pass_p99_ms'] <= 50)}** ({r['pass_p99_ms']} ms quiet, "
            f"{r['burst_pass_p99_ms']} ms in the burst)",
            f"- deploys/s >= 80% of N=50: **{verdict(bool(b) and r['deploys_per_s'] >= 0.8 * b['deploys_per_s'])}**"
            f" ({r['deploys_per_s']} against {b['deploys_per_s'] if b else '-'})",
            f"- failover of 500 <= 3 s after seen dead: **{verdict(bool(fo500) and fo500['after_dead_s'] <= 3)}** "
            f"({fo500['after_dead_s'] if fo500 else '-'} s)",
            f"- a tenth of the nodes killed at once ({tenth['nodes']} nodes, {tenth['moved']} deployments; the goal "
            f"is for 5,000), all running elsewhere <= 30 s: **{verdict(tenth['all_running_s'] <= 30)}** "
            f"({tenth['all_running_s']:.2f} s); duplicates: not measurable with hollow nodes (they run no "
            "process), the compare-and-set fence is tested with real ones (tests/test_heartbeat.py)",
            f"- dm status <= 0.5 s: **{verdict(r['status_cli_s'] <= 0.5)}** ({r['status_cli_s']:.2f} s as a command, "
            f"{r['status_fn_s']:.3f} s of it reading); dm deployments first page <= 0.3 s: "
            f"**{verdict(r['deployments_cli_s'] <= 0.3)}** ({r['deployments_cli_s']:.2f} s, "
            f"{r['deployments_fn_s']:.3f} s reading)",
        ]
    cpu = []
    for r in rows:
        f = r.get("failover500")
        if f and f.get("cpu_s"):
            spent = ", ".join(f"{k} {v:g}" for k, v in sorted(f["cpu_s"].items(), key=lambda kv: -kv[1]))
            cpu.append(f"- N={r['nodes']}, D={r['deployments']}: {f['all_running_s']:.1f} s of wall time; {spent}")
    burst = []
    for r in rows:
        if r.get("burst_cpu_s"):
            spent = ", ".join(f"{k} {v:g}" for k, v in sorted(r["burst_cpu_s"].items(), key=lambda kv: -kv[1]))
            burst.append(f"- N={r['nodes']}, D={r['deployments']}: {r['burst_s']:.1f} s of wall time; {spent}")
    return (
        "Hollow nodes (`dm node --hollow N`, 16 cores / 64 GiB each) and D background deployments recorded "
        "`running` in bulk; a real control worker; the reconcilers run and timed in the benchmark "
        "process every 0.5 s (the failure detector in a thread of its own, placement and scaling in "
        "another, as beat's separate tasks run; a pass figure is one reconciler's pass). "
        "Baseline: the N=50 row of the same run and D (ratios in brackets). "
        "Failover: from the kill of one hollow node (presence and lease, as `kill -9`) until all its "
        "deployments run elsewhere. `dm status` / `dm deployments`: a new process each (the interpreter's "
        "start included), and in brackets the reading functions alone.\n\n"
        + table(header, lines)
        + "\n\nCPU seconds each process used during the failover of 500 (two cores: at most twice the wall time):\n\n"
        + "\n".join(cpu)
        + "\n\nCPU seconds each process used while the burst's deploys were accepted (`deploy.delay` "
        "until the last result; the hollow process is the simulated fleet's, sharing the two cores):\n\n"
        + "\n".join(burst)
        + "\n\nGoals of issue 14 (set for N=1000, D=50,000), at the largest N of this run:\n\n"
        + "\n".join(goals)
        + "\n"
    )


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds the harness: every process stopped by PID


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # also when started in the background (where SIGINT is ignored) or sent SIGTERM
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    rows = []
    for d in [int(x) for x in args.deployments.split(",")]:
        for n in sorted({50, *[int(x) for x in args.nodes.split(",")]}):
            started = time.monotonic()
            row = one(n, d, args.burst, args.passes)
            row["run_s"] = round(time.monotonic() - started, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress, one row at a time
    if args.json:
        print(json.dumps(rows, indent=2))
    section = report(rows)
    if not args.json:
        print(section)
    if not args.no_doc:
        path = write_section("scale", "Scale: hollow nodes and many deployments (baseline: N=50, same run)", section)
        print("wrote", path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
