"""Placement throughput: ``dm.deployer.place`` per second with 50 registered nodes.

Starts a private embedded stack (no dm processes), registers 50 fake nodes in Redis
(``up``, 16 cpus / 64 GiB, a random metrics sample renewed every second as node agents
do, and a long lease: room for all), records ``--count`` pending deployments, reads them
in one query (as the heartbeat lists the waiting ones), and times ``place(ctl, id, doc)``
on each, one after another: one Redis script takes the placement lock and chooses the
node, then it compare-and-sets ``scheduled`` (its event in the same write), and one Redis
pipeline allocates, releases the lock and sends ``dm.run`` to the node's queue (nothing
consumes it). And ``deploy(ctl, request)`` of as many new requests: decide, one insert
of the deployment already ``scheduled``, allocate, send. Baseline, in the same run: the
registry's raw single-document write rates, ``update_one`` of a deployment-like document
by id and state, and ``insert_one``, on the ``deployments`` collection itself (same
indexes, same size).
Blocks of placements and of baseline writes alternate, so both see the same machine.
Goal: placements/s at least half the raw rate of the write a placement makes
(``update_one``); ``deploy`` of a new request, which inserts, is shown beside ``insert_one``.

A second, instrumented pass times each piece of ``place`` to show where the cost is.

    /work/venv/bin/python bench/placement.py [--count 800] [--nodes 50] [--no-doc]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import Harness, percentile, table, verdict, write_section

GOAL_FRACTION = 0.5
ALGORITHM = "benchsleep"
BLOCK = 100


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=800, help="timed placements (default 800)")
    p.add_argument("--split-count", type=int, default=150, help="placements of the instrumented pass (default 150)")
    p.add_argument("--nodes", type=int, default=50, help="registered nodes (default 50)")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks-core.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    with Harness("placement") as h:
        results = run(h, args)
    report(args, results, time.monotonic() - started)
    return 0


def setup(h: Harness, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from dm import fleet
    from dm.control import Control
    from dm.models import MetricsSample
    from dm.package import load_spec, pack
    from dm.settings import Settings

    ctl = Control(Settings.from_env())
    ctl.redis.flushdb()
    ctl.registry.ensure_indexes()
    directory = h.dir / "algorithm"
    directory.mkdir(parents=True)
    (directory / "algorithm.toml").write_text(
        f'name = "{ALGORITHM}"\nversion = "1.0.0"\ncommand = ["/bin/sleep", "60"]\ncpu = 0.05\nmemory = 16\n'
    )
    archive, sha = pack(directory)
    algorithm = ctl.registry.add_algorithm(load_spec(directory), archive, sha)
    rng = random.Random(1)
    usage = {f"n{i + 1:03d}": (rng.uniform(5, 40), rng.uniform(5, 40)) for i in range(args.nodes)}
    for node_id in usage:
        fleet.register_node(ctl.redis, node_id, cpus=16, memory=65536, state="up", host="bench")

    def publish() -> None:  # as each node agent does every second: a new sample and its lease
        for node_id, (cpu, ram) in usage.items():
            fleet.publish(ctl.redis, MetricsSample(node_id, cpu=cpu, ram=ram), lease_ttl=600, token="bench")

    publish()

    def samples() -> None:
        while not h.stopping.wait(1.0):
            publish()

    threading.Thread(target=samples, name="samples", daemon=True).start()
    return ctl, algorithm


def create(ctl: Any, algorithm: dict[str, Any], count: int) -> tuple[list[str], float]:
    from dm.models import DeployRequest

    t0 = time.perf_counter()
    ids = [
        ctl.registry.create_deployment(DeployRequest(algorithm=ALGORITHM), algorithm)[0]["_id"] for _ in range(count)
    ]
    return ids, time.perf_counter() - t0


def run(h: Harness, args: argparse.Namespace) -> dict[str, Any]:
    from dm import deployer
    from dm.models import SCHEDULED, DeployRequest

    ctl, algorithm = setup(h, args)
    # the baseline writes go to the deployments collection itself: same indexes, same size
    raw = ctl.registry.deployments
    results: dict[str, Any] = {"place": [], "update": [], "insert": [], "blocks": [], "create": [], "deploy": []}
    # warm-up: connections, the Celery producer pool, the lock script
    for dep_id in create(ctl, algorithm, 5)[0]:
        deployer.place(ctl.ports, dep_id)
    template = ctl.registry.deployments.find_one({})
    print(f"{args.nodes} nodes registered; recording and placing {args.count} deployments ...", flush=True)
    done = 0
    while done < args.count:
        # recorded block by block, so the collections grow during the run as in a live system
        block, seconds = create(ctl, algorithm, min(BLOCK, args.count - done))
        results["create"].append((len(block), seconds))
        # baseline: raw inserts, then the CAS-like update of each, of deployment-like documents
        docs = [{**template, "_id": f"raw-{done + i}", "request_id": f"raw-{done + i}", "state": "pending",
                 "generation": 0} for i in range(len(block))]  # fmt: skip
        t0 = time.perf_counter()
        for doc in docs:
            raw.insert_one(doc)
        results["insert"].append((len(docs), time.perf_counter() - t0))
        t0 = time.perf_counter()
        for doc in docs:
            raw.update_one(
                {"_id": doc["_id"], "state": {"$in": ["pending", "lost"]}, "generation": 0},
                {"$set": {"state": SCHEDULED, "node": "n001", "reason": "placed", "updated_at": time.time(),
                          "scheduled_at": time.time(), "pid": None},
                 "$inc": {"rev": 1, "generation": 1}},
            )  # fmt: skip
        results["update"].append((len(docs), time.perf_counter() - t0))
        # dm: place each, as the heartbeat places waiting ones: listed in one read, then placed
        listed = {d["_id"]: d for d in ctl.registry.deployments.find({"_id": {"$in": block}})}
        times = []
        t0 = time.perf_counter()
        for dep_id in block:
            t = time.perf_counter()
            placed = deployer.place(ctl.ports, dep_id, listed[dep_id])
            times.append(time.perf_counter() - t)
            if placed["state"] != SCHEDULED:
                raise RuntimeError(f"deployment {dep_id} was not placed: {placed['state']} ({placed.get('reason')})")
        results["blocks"].append((len(block), time.perf_counter() - t0))
        results["place"] += times
        # dm: new requests, recorded already placed (the path of `deploy.delay`)
        t0 = time.perf_counter()
        for i in range(len(block)):
            made = deployer.deploy(ctl.ports, DeployRequest(algorithm=ALGORITHM, request_id=f"bench-new-{done + i}"))
            if made["state"] != SCHEDULED:
                raise RuntimeError(f"request {done + i} was not placed: {made['state']} ({made.get('reason')})")
        results["deploy"].append((len(block), time.perf_counter() - t0))
        done += len(block)
    results["create_rate"] = sum(n for n, _ in results["create"]) / sum(t for _, t in results["create"])
    results["nodes_used"] = len({d["node"] for d in ctl.registry.deployments.find({}, {"node": 1})})
    results["split"] = split(ctl, algorithm, args.split_count)
    return results


class _TimedPipeline:
    """A Redis pipeline whose ``execute`` is timed (allocation + the ``dm.run`` message)."""

    def __init__(self, pipe: Any, record: Callable[[str, float], None]) -> None:
        self.pipe, self.record = pipe, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def execute(self) -> Any:
        t = time.perf_counter()
        try:
            return self.pipe.execute()
        finally:
            self.record("allocate, release the lock, dispatch (one Redis pipeline)", time.perf_counter() - t)


def split(ctl: Any, algorithm: dict[str, Any], count: int) -> dict[str, float]:
    """Mean seconds per placement spent in each piece of ``place`` (wrapped, then restored)."""
    from dm import balancer, deployer, fleet

    spent: dict[str, float] = defaultdict(float)

    def record(name: str, seconds: float) -> None:
        spent[name] += seconds

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                record(name, time.perf_counter() - t)

        return wrapper

    ids, _ = create(ctl, algorithm, count)
    listed = {d["_id"]: d for d in ctl.registry.deployments.find({"_id": {"$in": ids}})}
    originals = {
        (fleet, "decide"): fleet.decide,
        (fleet, "snapshot"): fleet.snapshot,
        (balancer, "choose"): balancer.choose,
        (fleet, "allocate"): fleet.allocate,
    }
    store, r = ctl.ports.store, ctl.redis
    try:
        fleet.decide = timed("take the lock and decide (one Redis script)", fleet.decide)
        fleet.snapshot = timed("read the fleet (when the script finds no room; not here)", fleet.snapshot)
        balancer.choose = timed("choose in Python (p2c, or no room; not here)", balancer.choose)
        fleet.allocate = timed("queue the allocation (into the pipeline)", fleet.allocate)
        pipeline = r.pipeline
        r.pipeline = lambda *a, **k: _TimedPipeline(pipeline(*a, **k), record)
        store.get = timed("read the deployment (MongoDB find_one)", store.get)  # type: ignore[method-assign]
        store.compare_and_set = timed(  # type: ignore[method-assign]
            "registry write (CAS update_one, its event in the same write)", store.compare_and_set
        )
        t0 = time.perf_counter()
        for dep_id in ids:
            deployer.place(ctl.ports, dep_id, listed[dep_id])
        total = time.perf_counter() - t0
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
        for name in ("get", "compare_and_set"):
            store.__dict__.pop(name, None)
        r.__dict__.pop("pipeline", None)
    parts = {name: seconds / count for name, seconds in spent.items()}
    parts["other (Python in place, loop)"] = total / count - sum(parts.values())
    parts["total"] = total / count
    return parts


def report(args: argparse.Namespace, res: dict[str, Any], elapsed: float) -> None:
    def rate(blocks: list[tuple[int, float]]) -> float:
        return sum(n for n, _ in blocks) / sum(s for _, s in blocks)

    place_rate, update_rate, insert_rate = rate(res["blocks"]), rate(res["update"]), rate(res["insert"])
    deploy_rate = rate(res["deploy"])
    first, last = res["blocks"][0], res["blocks"][-1]
    ok = place_rate >= GOAL_FRACTION * update_rate
    lat = res["place"]
    rates = table(
        ["operation", "n", "per second", "mean ms", "p50 ms", "p99 ms"],
        [
            ["baseline: `update_one` by id + state (raw CAS-like write, same collection)",
             sum(n for n, _ in res["update"]),
             f"{update_rate:.0f}", f"{1000 / update_rate:.2f}", "", ""],
            ["baseline: `insert_one` of a deployment-like document (same collection)", sum(n for n, _ in res["insert"]),
             f"{insert_rate:.0f}", f"{1000 / insert_rate:.2f}", "", ""],
            [f"dm: `place()` with {args.nodes} nodes", len(lat), f"{place_rate:.0f}", f"{1000 / place_rate:.2f}",
             f"{percentile(lat, 50) * 1000:.2f}", f"{percentile(lat, 99) * 1000:.2f}"],
            ["dm: `deploy()` of a new request (decision + one insert with its events + dispatch)",
             sum(n for n, _ in res["deploy"]), f"{deploy_rate:.0f}", f"{1000 / deploy_rate:.2f}", "", ""],
            ["(for reference) `create_deployment` (one insert, its event inside)", args.count,
             f"{res['create_rate']:.0f}", f"{1000 / res['create_rate']:.2f}", "", ""],
        ],
    )  # fmt: skip
    parts = res["split"]
    total = parts["total"]
    split_table = table(
        ["piece of `place()` (instrumented pass)", "mean ms", "share"],
        [[name, f"{sec * 1000:.3f}", f"{sec / total:.0%}"] for name, sec in parts.items() if name != "total"]
        + [["total per placement", f"{total * 1000:.3f}", "100%"]],
    )
    growth = (
        f"First block of {first[0]}: {first[0] / first[1]:.0f}/s; last block (with {args.count - last[0]} "
        f"deployments already recorded and allocated across the nodes): {last[0] / last[1]:.0f}/s."
    )
    summary = (
        f"`place()`/s vs raw `update_one`/s (the write a placement makes): **{place_rate / update_rate:.2f}** "
        f"(goal >= {GOAL_FRACTION}): **{verdict(ok)}**. For reference, `place()` vs raw `insert_one`: "
        f"{place_rate / insert_rate:.2f}; `deploy()` of a new request (one insert) vs raw `insert_one`: "
        f"{deploy_rate / insert_rate:.2f}."
    )
    setup = (
        f"{args.nodes} fake nodes registered in Redis (`up`, 16 cpus / 64 GiB each, random 5-40% usage); the "
        "algorithm declares 0.05 cpu / 16 MiB; "
        f"{args.count} deployments recorded `pending`, listed, then placed one after another with `place()`, "
        f"and {args.count} new requests placed with `deploy()` (recorded "
        f"already `scheduled`), in blocks of {BLOCK}, alternating with blocks of baseline writes to the same "
        f"SecantusDB; they landed on {res['nodes_used']} nodes. The instrumented "
        f"pass places {args.split_count} more. Run time {elapsed:.0f} s."
    )
    print()
    for part in (rates, split_table, growth, summary):
        print(part + "\n")
    if not args.no_doc:
        body = f"{setup}\n\n{rates}\n\n{split_table}\n\n{growth}\n\n{summary}\n"
        key = "placement" if args.nodes == 50 else f"placement_{args.nodes}"  # one section per fleet size
        baseline = "raw `update_one` / `insert_one` on the same collection"
        title = f"Placement throughput with {args.nodes} nodes (baseline: {baseline})"
        print(f"wrote {write_section(key, title, body)}")


if __name__ == "__main__":
    raise SystemExit(main())
