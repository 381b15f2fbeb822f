"""Node agent at idle: memory (PSS) and CPU with no deployments, against a bare Celery worker.

Starts a private embedded stack, one real node agent (``python -m workers --id X --cpus 1
--memory 1024``, as the node manager starts one) and, as the baseline, a bare ``celery
worker`` of a minimal app (threads pool, the same concurrency, the same Redis). Once the
agent's ``dm:node:X`` hash says ``up`` and the baseline answers a ping, both settle, then
are measured over the same window: CPU time used (percent of one core) and memory
(RSS sampled every second: the last and the largest; PSS and USS at the end). The agent
is measured alone and with its children (the fence watchdog it forks), as the node's
whole cost. Both goals are judged on that tree: at most 80 MB of memory (PSS: pages the
watchdog shares with the agent since the fork counted once, where a sum of RSS counts
them twice) and 1% of a core. The agent alone is shown for reference. A second agent runs with
containment off (``DM_CONTAINMENT=none DM_UID_RANGE=off``) beside it: containment must cost
nothing at idle.

    /work/venv/bin/python bench/node_idle.py [--seconds 20] [--no-doc]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import Harness, baseline_app, baseline_worker_cmd, table, verdict, wait_for, write_section

TITLE = "Node agent at idle: memory and CPU (baseline: a bare celery worker)"
#: the node's memory at idle, agent and watchdog together (PSS, MiB)
GOAL_MEMORY_MB = 80.0
GOAL_CPU_PERCENT = 1.0
MB = 1024 * 1024


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window (default 20)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait once up, before measuring (default 5)")
    p.add_argument("--concurrency", type=int, default=4, help="task threads of both (default 4, the agent's default)")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks-core.md")
    return p.parse_args(argv)


@dataclass
class Watch:
    """CPU and memory of one process, or of it and its children (``tree``)."""

    name: str
    pid: int
    tree: bool = False
    procs: list[Any] = field(default_factory=list)
    cpu0: float = 0.0
    rss: list[float] = field(default_factory=list)
    cpu_percent: float = 0.0
    pss: float = 0.0
    uss: float = 0.0
    threads: int = 0

    def members(self) -> list[Any]:
        import psutil

        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)] if self.tree else [root]

    def start(self) -> None:
        self.procs = self.members()
        self.cpu0 = sum(_cpu(p) for p in self.procs)

    def sample(self) -> None:
        self.rss.append(sum(p.memory_info().rss for p in self.members()) / MB)

    def finish(self, seconds: float) -> None:
        self.cpu_percent = (sum(_cpu(p) for p in self.procs) - self.cpu0) / seconds * 100.0
        full = [p.memory_full_info() for p in self.members()]
        self.pss = sum(getattr(m, "pss", m.rss) for m in full) / MB
        self.uss = sum(m.uss for m in full) / MB
        self.threads = sum(p.num_threads() for p in self.members())


def _cpu(proc: Any) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    with Harness("node_idle") as h:
        watches = run(h, args)
    report(args, watches, time.monotonic() - started)
    return 0


def run(h: Harness, args: argparse.Namespace) -> list[Watch]:
    import redis

    from dm import keys as k

    node_id = f"idle-{uuid.uuid4().hex[:6]}"
    agent = h.spawn("agent", [sys.executable, "-m", "workers", "--id", node_id, "--cpus", "1", "--memory", "1024",
                              "--concurrency", str(args.concurrency)])  # fmt: skip
    env, off_id = h.env, f"{node_id}-off"
    h.env = {**env, "DM_CONTAINMENT": "none", "DM_UID_RANGE": "off"}
    off = h.spawn("agent-off", [sys.executable, "-m", "workers", "--id", off_id, "--cpus", "1", "--memory", "1024",
                                "--concurrency", str(args.concurrency)])  # fmt: skip
    h.env = env
    name = f"baseline-{uuid.uuid4().hex[:6]}"
    base = h.spawn("baseline", baseline_worker_cmd(args.concurrency, name=name))
    r = redis.Redis.from_url(h.stack.redis_url, decode_responses=True)

    def agent_up() -> bool:
        h.check_alive()
        return all(r.hget(k.NODE.format(n), "state") == "up" for n in (node_id, off_id))

    def baseline_up() -> bool:
        h.check_alive()
        return bool(baseline_app.control.ping(destination=[f"{name}@{socket.gethostname()}"], timeout=0.5))

    wait_for(agent_up, 60, f"node {node_id} up")
    wait_for(baseline_up, 60, "the baseline worker to answer a ping")
    print(f"node agent (pid {agent.pid}) and baseline worker (pid {base.pid}) up; settling {args.settle:g} s, "
          f"then measuring {args.seconds:g} s ...", flush=True)  # fmt: skip
    time.sleep(args.settle)
    mode = r.hget(k.NODE.format(node_id), "containment")
    watches = [Watch("baseline: bare `celery worker` (threads)", base.pid),
               Watch("dm node agent process alone (for reference)", agent.pid),
               Watch(f"**dm node agent + children (watchdog); containment {mode}: judged**", agent.pid, tree=True),
               Watch("dm node agent + children, containment off", off.pid, tree=True)]  # fmt: skip
    for w in watches:
        w.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        for w in watches:
            w.sample()
        time.sleep(min(1.0, max(0.0, args.seconds - (time.monotonic() - t0))))
    elapsed = time.monotonic() - t0
    h.check_alive()
    for w in watches:
        w.finish(elapsed)
    if r.hget(k.NODE.format(node_id), "state") != "up":
        raise RuntimeError(f"node {node_id} is no longer up after the window")
    return watches


def report(args: argparse.Namespace, watches: list[Watch], elapsed: float) -> None:
    base, agent, tree, _ = watches
    rows = [
        [w.name, len(w.procs), w.threads, f"{w.rss[-1]:.1f}", f"{max(w.rss):.1f}", f"{w.pss:.1f}", f"{w.uss:.1f}",
         f"{w.cpu_percent:.2f}"]
        for w in watches
    ]  # fmt: skip
    figures = table(
        [
            "process",
            "procs",
            "threads",
            "RSS MB",
            "max RSS MB",
            "PSS MB",
            "USS MB",
            f"CPU % of a core ({args.seconds:g} s)",
        ],
        rows,
    )
    memory_ok = tree.pss <= GOAL_MEMORY_MB
    cpu_ok = tree.cpu_percent <= GOAL_CPU_PERCENT
    summary = (
        f"Agent and its watchdog together: PSS {tree.pss:.1f} MB vs goal <= {GOAL_MEMORY_MB:g} MB: "
        f"**{verdict(memory_ok)}** ({tree.pss / base.pss:.2f}x the bare worker's PSS; the sum of their RSS, "
        f"which counts shared pages twice, {tree.rss[-1]:.1f} MB); idle CPU {tree.cpu_percent:.2f}% of a core "
        f"vs goal <= {GOAL_CPU_PERCENT:g}%: **{verdict(cpu_ok)}** (bare worker {base.cpu_percent:.2f}%). "
        f"For reference, the agent process alone: RSS {agent.rss[-1]:.1f} MB, PSS {agent.pss:.1f} MB, "
        f"CPU {agent.cpu_percent:.2f}%."
    )
    setup = (
        f"One node agent (`python -m workers --cpus 1 --memory 1024 --concurrency {args.concurrency}`, no "
        "deployments, no control worker) and a bare `celery worker -P threads "
        f"-c {args.concurrency} --without-gossip --without-mingle` of a minimal JSON app on the same Redis, "
        f"measured together {args.settle:g} s after both were up, over {args.seconds:g} s. MB = MiB. RSS is "
        "sampled every second (the last sample and the largest); PSS and USS are read at the end of the window. "
        "PSS splits pages shared with the forked watchdog (and with any other process) between them; RSS of "
        "a tree counts them twice. "
        f"Run time {elapsed:.0f} s."
    )
    print()
    print(figures)
    print()
    print(summary)
    if not args.no_doc:
        body = f"{setup}\n\n{figures}\n\n{summary}\n"
        print(f"wrote {write_section('node_idle', TITLE, body)}")


if __name__ == "__main__":
    raise SystemExit(main())
