"""What `dm status`, `dm nodes`, `dm deployments`, `dm watch` and the metrics show: the nodes
from one source, with the lease rule applied (a node whose lease expired is dead, whatever the
registry says yet); deployments and events read by index, never by scanning them all."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dm import balancer, fleet
from dm import keys as k
from dm.control import Control
from dm.models import STATES
from dm.registry import Doc


def node_rows(ctl: Control) -> list[dict[str, Any]]:
    # the node hashes carry the running totals of their allocations: no placement snapshot
    # (a script that reads every node while Redis serves no one else) is needed to show them
    with ThreadPoolExecutor(1) as pool:  # the registry's records read while Redis answers
        records = pool.submit(ctl.registry.list_nodes)
        hashes, leases = fleet.nodes_seen(ctl.redis)
        docs = records.result()
    rows = []
    for doc in docs:
        node_id = doc["_id"]
        h = hashes.get(node_id, {})
        cpu, ram = float(h.get("cpu", 0.0)), float(h.get("ram", 0.0))
        state = h.get("state") or doc.get("state")
        if state in ("up", "starting") and not leases.get(node_id) and "ts" in h:
            state = "dead"  # the lease says so before the next heartbeat check does
        rows.append(
            {
                "id": node_id,
                "name": f"node-{node_id}",
                "host": doc.get("host"),
                "address": doc.get("address"),
                "state": state,
                "cpus": doc.get("cpus"),
                "memory": doc.get("memory"),
                "cpu": round(cpu, 1),
                "ram": round(ram, 1),
                "load": round(balancer.load(cpu, ram), 1),
                "deployments": int(h.get("alloc_n") or 0),
                "committed_cpu": round(max(0.0, float(h.get("alloc_cpu") or 0.0)), 2),
                "pid": doc.get("pid"),
                # orders it refused for a missing or wrong signature (workers/tasks.py)
                "refused_orders": int(h.get("refused_orders") or 0),
                # how the node holds its algorithms (written by the node at start: workers/supervisor.py)
                "containment": h.get("containment") or doc.get("containment") or "unknown",
                "run_as": h.get("run_as") or doc.get("run_as") or "unknown",
            }
        )
    return rows


def deployment_usage(ctl: Control, node_ids: list[str]) -> dict[str, dict[str, float]]:
    """What each deployment on these nodes uses now: id -> {cpu (cores), memory (MiB),
    memory_limit (MiB), ts}, as its node last published it (absent: not measured lately)."""
    pipe = ctl.redis.pipeline(transaction=False)
    for node_id in node_ids:
        pipe.hgetall(k.USAGE.format(node_id))
    out: dict[str, dict[str, float]] = {}
    for fields in pipe.execute():
        for dep_id, raw in fields.items():
            try:
                out[dep_id] = json.loads(raw)
            except ValueError:
                continue
    return out


# -- deployments and events, read by index ------------------------------------------------

#: the first window of a newest-first listing, in seconds back from now (deployments may be
#: made by the thousand a second); each next window is sized from what the last one held,
#: between WINDOW_GROWTH times longer and 16 times (4 times after an empty one: a burst
#: beyond a gap is not jumped into whole); past WINDOW_LAST the rest is read at once
WINDOW_FIRST = 0.25
WINDOW_GROWTH = 2.0
WINDOW_LAST = 200 * 86400.0
#: rows of ``dm deployments`` by default
DEFAULT_LIMIT = 50


#: deployments counted one by one at most: past this many, the relay's counts are shown
COUNT_EXACT_UPTO = 5000


def deployment_counts(ctl: Control) -> dict[str, int]:
    """Deployments per state (states with none left out); see :func:`counted`."""
    return counted(ctl)[0]


def counted(ctl: Control) -> tuple[dict[str, int], str]:
    """Deployments per state, and how they were counted: ``relay`` (the counts the relay keeps
    from the events, up to its mark: a fraction of a second behind the registry) once there
    are more than :data:`COUNT_EXACT_UPTO`, else ``index`` (one count per state on the
    (state, created_at) index: exact, but it reads each deployment counted, 45 µs a document on
    SecantusDB: 2.2 s for 50,000). Counted by index also while the relay has none to give (not
    running, or counting again)."""
    relay = ctl.registry.relay_counts()
    if relay is not None and sum(relay.values()) > COUNT_EXACT_UPTO:
        return {state: n for state, n in relay.items() if n}, "relay"
    counts: dict[str, int] = {}
    for state in STATES:
        n = ctl.registry.deployments.count_documents({"state": str(state)})
        if n:
            counts[str(state)] = n
    return counts, "index"


def recent_events(ctl: Control, limit: int = 10) -> list[Doc]:
    """The last ``limit`` events, oldest first: the numbers (the ``_id``) up to the relay's mark,
    looked up one by one (``$in``) rather than a sort of every event. Not an ``_id`` range:
    SecantusDB scans the collection for one (336 ms at 30,000 events, against 0.8 ms for
    the same ids as ``$in``). Numbers may have gaps (an event stored twice keeps one), so
    the span widens until it holds enough."""
    registry = ctl.registry
    mark = registry.events_mark()
    if mark <= 0 or limit <= 0:
        return []
    span = limit
    while True:
        low = max(0, mark - span)
        rows = sorted(registry.events.find({"_id": {"$in": list(range(low + 1, mark + 1))}}), key=lambda e: e["_id"])
        if len(rows) >= limit or low == 0:
            return rows[-limit:]
        span *= 4


def list_deployments(
    ctl: Control,
    *,
    states: list[str] | None = None,
    node: str | None = None,
    algorithm: str | None = None,
    service: str | None = None,
    limit: int = DEFAULT_LIMIT,
    before: float | None = None,
) -> list[Doc]:
    """Deployments newest first (by ``created_at``), at most ``limit`` (0: all), created before
    ``before`` if given (the next page starts at the last row's ``created_at``).

    Every read is bounded by an index: a node's deployments by (node, state); otherwise, for
    each state asked for (or every state), windows of ``created_at`` on the (state,
    created_at) index, each window further back and longer, until the page is full (the
    first page's windows start at the newest deployment the relay has seen). The
    registry (SecantusDB) reads every document a query matches before it applies a limit (a
    limit only saves sending them), so a window, not a limit, is what keeps a page's cost
    the size of the page. The other filters are applied to what the windows return.
    """
    deployments = ctl.registry.deployments
    wanted: Doc = {}
    if states:
        wanted["state"] = set(states)
    for name, value in (("node", node), ("algorithm", algorithm), ("service", service)):
        if value is not None:
            wanted[name] = {value}

    def keep(doc: Doc) -> bool:
        if before is not None and float(doc.get("created_at") or 0) >= before:
            return False
        return all(doc.get(name) in values for name, values in wanted.items())

    def newest_first(docs: list[Doc]) -> list[Doc]:
        rows = sorted((d for d in docs if keep(d)), key=lambda d: (-float(d.get("created_at") or 0), d["_id"]))
        return rows[:limit] if limit else rows

    projection = {"history": 0}
    if node is not None:  # a node holds a bounded number: read them all by (node, state)
        query: Doc = {"node": node, **({"state": {"$in": list(states)}} if states else {})}
        return newest_first(list(deployments.find(query, projection)))
    if limit <= 0:  # everything asked for (--all): one read, whatever it costs
        return newest_first(list(deployments.find({}, projection)))
    # one query per state (an equality: with $in the planner gives up the range), each on the
    # (state, created_at) index: no index of their own for algorithm, service or age alone,
    # since every index costs on every transition (about 0.3 ms each, measured)
    drivers: list[Doc] = [{"state": state} for state in (states or STATES)]
    top = before if before is not None else None
    now = time.time() if before is None else before
    if before is None and (newest := ctl.registry.newest_created()) is not None:
        # none was made after the relay's newest but what it has yet to see (its lag, open
        # above the first window): the windows reach back from there, not from now; from now,
        # a page read an hour after a burst jumped the quiet hour with windows as wide, and
        # the one that reached the burst read all of it (50,000 documents, 1.5 s)
        now = min(now, newest)
    found: list[Doc] = []
    window = width = WINDOW_FIRST
    while True:
        low = now - window if window <= WINDOW_LAST else None
        span: Doc = {}
        if low is not None:
            span["$gte"] = low
        if top is not None:
            span["$lt"] = top
        before_this = len(found)
        for driver in drivers:
            query = {**driver, **({"created_at": span} if span else {})}
            cursor = deployments.find(query, projection).sort("created_at", -1)
            if all(name in driver for name in wanted):  # nothing left to filter: the rest of the page at most
                cursor = cursor.limit(limit - before_this)  # (halves the cost of a dense window)
            found += [d for d in cursor if keep(d)]
        if len(found) >= limit or low is None:
            return newest_first(found)
        # the next window, sized to hold about what the page still lacks at this one's density
        held = len(found) - before_this
        growth = 4.0 if held == 0 else min(16.0, max(WINDOW_GROWTH, 1.5 * (limit - len(found)) / held))
        top, width = low, width * growth
        window += width
