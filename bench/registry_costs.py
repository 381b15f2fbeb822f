"""Registry costs: what the registry server charges for the reads and writes dm makes, per
document, on the embedded stack's MongoDB-compatible server (SecantusDB).

The figures that bound the scale goals (docs/benchmarks.md, the scale section) are the
registry's: a failover is one write per deployment and the node's ``running`` report, and
``dm status`` counts deployments per state. This measures those operations alone, on D
deployments shaped as dm records them (``running``, a tenth ``succeeded``, their events in
``history``), in a private embedded stack:

- a transition as dm writes it (``update_one`` on id and rev: ``$set`` state, ``$inc`` rev,
  ``$push`` its event), one at a time, and in bulk writes of 100 (``bulk_write``, as a
  batch placement or a failover writes);
- ``count_documents`` of one state (as ``dm status`` counts each state, on the (state,
  created_at) index), and ``estimated_document_count``;
- a state's newest 50 (sort and limit on the same index: every match is read, which is why
  ``dm deployments`` reads windows of ``created_at`` instead).

Baseline, in the same run: the same operations on a copy of the documents in a collection
with no index but ``_id`` (what the registry's indexes add to each write), and, for the
reads, the cost per document matched. Writes alternate between the two collections in
blocks, so both see the same machine.

    python bench/registry_costs.py [--deployments 10000] [--writes 500] [--json] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import Harness, percentile, table, write_section

BLOCK = 50
BULK = 100


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deployments", type=int, default=10_000, help="documents in each collection (default 10000)")
    p.add_argument("--writes", type=int, default=500, help="transitions timed of each kind (default 500)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    return p.parse_args(argv)


def documents(ctl: Any, count: int) -> list[dict[str, Any]]:
    from dm.lifecycle import event_of
    from dm.models import DeployRequest

    algorithm = {"name": "costs", "version": "1.0.0", "sha256": "0" * 64,
                 "spec": {"command": ["/bin/true"], "demand": {"cpu": 0.01, "memory": 1.0},
                          "restart": {"policy": "never"}}}  # fmt: skip
    docs = []
    now = time.time()
    for i in range(count):
        doc = ctl.registry.new_deployment(DeployRequest(algorithm="costs"), algorithm, node=str(i % 50 + 1))
        state = "succeeded" if i % 10 == 0 else "running"
        doc.update(state=state, rev=2, created_at=now - i, updated_at=now, reason="seeded")
        doc["history"].append(event_of(doc, "scheduled"))
        docs.append(doc)
    return docs


def transition(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and update of one transition as the registry adapter writes it."""
    from dm.lifecycle import event_of

    new = {**doc, "state": "lost", "reason": "bench", "updated_at": time.time(), "rev": doc["rev"] + 1}
    new.pop("history", None)
    sets = {"state": "lost", "reason": "bench", "updated_at": new["updated_at"]}
    update = {"$set": sets, "$inc": {"rev": 1}, "$push": {"history": event_of(new)}}
    return {"_id": doc["_id"], "rev": doc["rev"]}, update


def timed(fn: Callable[[], Any], runs: int = 5) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - started) / runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pymongo import UpdateOne

    from dm.control import Control
    from dm.settings import Settings

    figures: dict[str, Any] = {"deployments": args.deployments, "writes": args.writes}
    with Harness("registry_costs") as h:
        ctl = Control(Settings.from_env())
        ctl.registry.ensure_indexes()
        dm_col = ctl.registry.deployments
        base_col = ctl.registry.db["baseline_deployments"]
        docs = documents(ctl, args.deployments)
        for low in range(0, len(docs), 1000):
            dm_col.insert_many([dict(d) for d in docs[low : low + 1000]], ordered=False)
            base_col.insert_many([dict(d) for d in docs[low : low + 1000]], ordered=False)
        figures["indexes"] = sorted(dm_col.index_information())
        running = [d for d in docs if d["state"] == "running"]
        singles = {"dm": [], "baseline": []}
        targets = iter(running)
        done = 0
        while done < args.writes:  # blocks alternate between the two collections
            block = [next(targets) for _ in range(min(BLOCK, args.writes - done))]
            for name, col in (("dm", dm_col), ("baseline", base_col)):
                for doc in block:
                    filter_, update = transition(doc)
                    t0 = time.perf_counter()
                    col.update_one(filter_, update)
                    singles[name].append(time.perf_counter() - t0)
            done += len(block)
        bulks: dict[str, list[float]] = {"dm": [], "baseline": []}
        done = 0
        while done < args.writes:
            block = [next(targets) for _ in range(min(BULK, args.writes - done))]
            for name, col in (("dm", dm_col), ("baseline", base_col)):
                ops = [UpdateOne(*transition(doc)) for doc in block]
                t0 = time.perf_counter()
                col.bulk_write(ops, ordered=False)
                bulks[name].append((time.perf_counter() - t0) / len(block))
            done += len(block)
        for name in ("dm", "baseline"):
            figures[f"single_{name}_p50_ms"] = round(percentile(singles[name], 50) * 1000, 2)
            figures[f"bulk_{name}_per_doc_ms"] = round(sum(bulks[name]) / len(bulks[name]) * 1000, 2)
        matched = dm_col.count_documents({"state": "running"})
        figures["running_matched"] = matched
        figures["count_s"] = round(timed(lambda: dm_col.count_documents({"state": "running"})), 3)
        figures["count_per_doc_us"] = round(figures["count_s"] / matched * 1e6, 1)
        figures["estimated_count_s"] = round(timed(dm_col.estimated_document_count), 3)
        page = lambda: list(  # noqa: E731
            dm_col.find({"state": "running"}, {"history": 0}).sort("created_at", -1).limit(50)
        )
        figures["first_page_s"] = round(timed(page), 3)
        scan = lambda: sum(1 for _ in base_col.find({}, {"_id": 1}))  # noqa: E731
        figures["baseline_scan_s"] = round(timed(scan), 3)
        figures["baseline_scan_per_doc_us"] = round(figures["baseline_scan_s"] / args.deployments * 1e6, 1)
        figures["machine_dir"] = str(h.dir)
    return figures


def report(f: dict[str, Any], took: float) -> str:
    d = f["deployments"]
    writes = table(
        ["write (per deployment)", "dm's collection (indexes: " + ", ".join(f["indexes"]) + ")", "baseline: `_id` only",
         "ratio"],
        [
            ["one transition, `update_one` (p50)", f"{f['single_dm_p50_ms']} ms", f"{f['single_baseline_p50_ms']} ms",
             f"{f['single_dm_p50_ms'] / f['single_baseline_p50_ms']:.2f}x"],
            [f"in bulk writes of {BULK}, per document", f"{f['bulk_dm_per_doc_ms']} ms",
             f"{f['bulk_baseline_per_doc_ms']} ms", f"{f['bulk_dm_per_doc_ms'] / f['bulk_baseline_per_doc_ms']:.2f}x"],
        ],
    )  # fmt: skip
    reads = table(
        ["read", "time", "per document"],
        [
            [f"`count_documents` of one state ({f['running_matched']} match), as `dm status` counts",
             f"{f['count_s'] * 1000:.0f} ms", f"{f['count_per_doc_us']} µs counted"],
            ["`estimated_document_count` (metadata only on MongoDB)", f"{f['estimated_count_s'] * 1000:.0f} ms", ""],
            ["a state's newest 50 (sort and limit on (state, created_at)): what `dm deployments` avoids by windows",
             f"{f['first_page_s'] * 1000:.0f} ms", ""],
            [f"baseline: a scan of every `_id` ({d})", f"{f['baseline_scan_s'] * 1000:.0f} ms",
             f"{f['baseline_scan_per_doc_us']} µs read"],
        ],
    )  # fmt: skip
    return (
        f"{d} deployments in each collection, shaped as dm records them; {f['writes']} transitions of each kind "
        f"timed, in blocks alternating between the two collections. Run time {took:.0f} s.\n\n"
        + writes + "\n\n" + reads + "\n\n"
        "What this run measured: dm's indexes add to every transition "
        f"({f['single_dm_p50_ms']} against {f['single_baseline_p50_ms']} ms one at a time, "
        f"{f['bulk_dm_per_doc_ms']} against {f['bulk_baseline_per_doc_ms']} ms a document in bulk), and a count "
        f"costs in proportion to what it counts ({f['count_per_doc_us']} µs a document), as does a sorted page "
        "with a limit (every match is read).\n"
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    figures = run(args)
    took = time.monotonic() - started
    body = report(figures, took)
    if args.json:
        print(json.dumps({k: v for k, v in figures.items() if k != "machine_dir"}))
    else:
        print(body)
    if not args.no_doc:
        title = "Registry costs: per document, dm's writes and reads (baseline: the same on an `_id`-only collection)"
        print(f"wrote {write_section('registry_costs', title, body)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
