"""The failure detector: which nodes are dead, and the fail-over of their deployments.

The signals, fastest first: the local provider saw the agent's process exit; the node's
presence connection (client name ``dm-node-<id>``) left Redis in two passes in a row; its
lease expired. A process that dies closes its sockets and takes its children with it, so
the first two need no lease. The lease is the rule for silent failures (a frozen or cut-off
host), whose agent kills its own algorithms before the lease can expire.

No verdict from a blind control plane: after Redis was out of reach, stalled or restarted
(a new ``run_id``), or no pass ran for a while, every node gets one lease period to renew
before its lease is judged, and presence counts only once a node was seen present in the
server's current run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dm import keys as k
from dm.lifecycle import ACTIVE, LIVE_NODE, Actor, D, NodeState, set_node_state, transition_many
from dm.ports import Ports
from dm.settings import Settings

log = logging.getLogger(__name__)

#: seconds a ``starting`` node may take to publish its first lease
NODE_START_GRACE = 30.0
#: a pass this long after the last one (in heartbeat intervals, at least a second) means
#: the control plane was blind meanwhile
BLIND_GAP_INTERVALS = 4


@dataclass(frozen=True)
class Observation:
    """What one pass saw; the input of :func:`judge`."""

    now: float
    #: node id -> its fleet hash (state, cpus, memory, ts, since, ...)
    nodes: dict[str, dict[str, str]]
    leases: dict[str, bool]
    #: node ids with a presence connection; None when that cannot be seen
    present: set[str] | None
    exited: set[str]
    server_id: str
    #: node id -> the server run it was last seen present in
    present_in: dict[str, str]
    #: node id -> when its presence connection was first seen missing
    absent_since: dict[str, float]
    #: what the detector remembers of the store: server, seen, blind_until
    detector: dict[str, str]


@dataclass
class Verdict:
    dead: dict[str, str] = field(default_factory=dict)
    #: of the dead, those judged by their lease alone (they may be alive and cut off)
    silent: set[str] = field(default_factory=set)
    present_in: dict[str, str] = field(default_factory=dict)
    absent_since: dict[str, float] = field(default_factory=dict)
    absent_drop: list[str] = field(default_factory=list)
    blind_until: float = 0.0
    #: why the control plane was blind (logged once when it starts)
    blind_reason: str = ""


def judge(obs: Observation, s: Settings) -> Verdict:
    """The pure decision of a pass."""
    v = Verdict()
    now = obs.now
    blind_until = float(obs.detector.get("blind_until") or 0.0)
    seen = float(obs.detector.get("seen") or 0.0)
    server = obs.detector.get("server") or ""
    gap = max(1.0, s.heartbeat_interval * BLIND_GAP_INTERVALS)
    if not obs.detector:
        v.blind_reason = "no earlier check in this Redis (a new or emptied server)"
    elif server and server != obs.server_id:
        v.blind_reason = "Redis restarted (a new run)"
    elif seen and now - seen > gap:
        v.blind_reason = f"no check for {now - seen:.1f}s (Redis or the control plane was away)"
    if v.blind_reason:
        blind_until = max(blind_until, now + s.lease_ttl)
    v.blind_until = blind_until
    live = {n: h for n, h in obs.nodes.items() if h.get("state") in (*LIVE_NODE, NodeState.STOPPING)}
    up = [n for n, h in live.items() if h.get("state") == NodeState.UP]
    gone: set[str] = set()
    if obs.present is not None:
        here = [n for n in up if n in obs.present]
        v.present_in = {n: obs.server_id for n in here if obs.present_in.get(n) != obs.server_id}
        missing = [n for n in up if n not in obs.present and obs.present_in.get(n) == obs.server_id]
        v.absent_drop = [n for n in obs.absent_since if n not in missing]
        v.absent_since = {n: now for n in missing if n not in obs.absent_since}
        gone = {n for n in missing if n in obs.absent_since}  # missing in two passes in a row
    for node_id, h in live.items():
        if node_id in obs.exited:
            v.dead[node_id] = f"node-{node_id} agent process exited"
        elif node_id in gone:
            v.dead[node_id] = f"node-{node_id} connection to Redis closed"
        elif not obs.leases.get(node_id) and now >= blind_until:
            if "ts" not in h and h.get("state") == NodeState.STARTING:
                since = float(h.get("since") or now)
                if now - since < NODE_START_GRACE:
                    continue  # still starting: it has not published its first lease yet
                v.dead[node_id] = f"node-{node_id} did not start within {NODE_START_GRACE:g}s"
                v.silent.add(node_id)
            else:
                v.dead[node_id] = f"node-{node_id} lease expired"
                v.silent.add(node_id)
    return v


def observe(ports: Ports, now: float | None = None) -> Observation:
    """What a pass sees. Its time is ``now`` if given, else the time Redis answered its reads,
    not the time the pass began: a pass that waited out a stall (or several, started while it
    lasted) measures the gap since the pass before it."""
    f = ports.fleet
    nodes = f.observe()  # the live nodes only, with their leases: one read
    present = f.present()
    exited = set(ports.provider.exited())
    server_id = f.server_id()
    present_in = f.marks(k.PRESENT_IN)
    absent_since = {n: float(t) for n, t in f.marks(k.ABSENT_SINCE).items()}
    detector = f.marks(k.DETECTOR)
    return Observation(
        now=time.time() if now is None else now,
        nodes=nodes,
        leases={n: h.get("lease") == "1" for n, h in nodes.items()},
        present=present,
        exited=exited,
        server_id=server_id,
        present_in=present_in,
        absent_since=absent_since,
        detector=detector,
    )


def run(ports: Ports, now: float | None = None) -> dict[str, Any]:
    """One pass: observe, judge, remember, fail over. Returns what it did."""
    obs = observe(ports, now)
    now = obs.now
    v = judge(obs, ports.settings)
    f = ports.fleet
    if v.blind_reason:
        log.warning("no lease verdicts until %.1fs from now: %s", v.blind_until - now, v.blind_reason)
        if obs.detector.get("server") != obs.server_id:
            from dm.reconcilers import allocations

            allocations.run(ports, now)  # a new Redis run may have lost them: rebuild from the registry
    f.set_marks(k.PRESENT_IN, v.present_in)
    f.set_marks(k.ABSENT_SINCE, {n: repr(t) for n, t in v.absent_since.items()}, drop=v.absent_drop)
    detector = {"server": obs.server_id, "seen": repr(now)}
    if v.blind_until != float(obs.detector.get("blind_until") or 0.0):
        detector["blind_until"] = repr(v.blind_until)
    if v.blind_reason:  # what `dm status` and the metrics show of the control store's health
        seen = float(obs.detector.get("seen") or now)
        detector.update(outage_at=repr(seen), outage_seconds=repr(round(now - seen, 3)), outage=v.blind_reason)
    f.set_marks(k.DETECTOR, detector)
    won = [(n, reason) for n, reason in sorted(v.dead.items()) if declare_dead(ports, n, reason, now, n in v.silent)]
    moved = move_many(ports, [(n, reason, now if n in v.silent else None) for n, reason in won], now) if won else 0
    if moved:  # a long fail-over is this pass at work, not the control plane away
        f.set_marks(k.DETECTOR, {"seen": repr(max(now, time.time()))})
    f.put(k.HEARTBEAT_LAST, repr(time.time()))
    return {"dead": sorted(v.dead), "failed_over": moved, "blind": v.blind_until > now}


#: seconds a mover of a dead node's deployments holds its lock at most without renewing it
#: (it renews it between batches of placements; a mover that died leaves the rest to the next
#: after this)
MOVE_LOCK_SECONDS = 20.0


def fail_over(ports: Ports, node_id: str, reason: str, now: float | None = None, silent: bool = False) -> int:
    """Mark a node dead and place its deployments again; returns how many moved (see
    :func:`declare_dead` and :func:`move_off`)."""
    now = time.time() if now is None else now
    if not declare_dead(ports, node_id, reason, now, silent):
        return 0
    return move_off(ports, node_id, reason, now, silent)


def declare_dead(ports: Ports, node_id: str, reason: str, now: float, silent: bool = False) -> bool:
    """Mark a node dead: True for the checker that wins the node's compare-and-set; the others
    only bring the fleet's copy of its state along. A pass declares all its dead nodes before
    it moves the deployments of any, so each verdict is recorded as soon as it is made."""
    if not set_node_state(ports, node_id, NodeState.DEAD, expect=(*LIVE_NODE, NodeState.STOPPING)):
        ports.fleet.set_state(node_id, NodeState.DEAD)  # another checker won: bring the copy along
        return False
    log.warning("%s: failing over its deployments", reason)
    if silent:
        ports.fleet.set_marks(k.DEAD_SINCE, {node_id: repr(now)})
    return True


def move_off(ports: Ports, node_id: str, reason: str, now: float, silent: bool = False) -> int:
    """Place the deployments of a node just declared dead again. After a ``silent`` failure (a
    verdict by the lease: the node may be alive and cut off, running its algorithms; a process
    that died, or whose connection closed, took its children with it), a deployment that asked
    to keep running on a cut-off node (``keep_for``) is moved that long after the verdict (by
    :mod:`dm.reconcilers.replace`): its node kills it before then."""
    if silent:
        return move_deployments(ports, node_id, reason, held_since=now, now=now)
    return move_deployments(ports, node_id, reason)


def move_deployments(
    ports: Ports, node_id: str, reason: str, held_since: float | None = None, now: float | None = None
) -> int:
    """Each active deployment of a dead node ``lost`` and placed again (compare-and-sets all);
    a ``stopping`` one is ``stopped``: its node killed it, or died with it. With ``held_since``
    (a silent failure then), one whose ``keep_for`` has not passed since stays for now."""
    return move_many(ports, [(node_id, reason, held_since)], now)


def move_many(ports: Ports, dead: list[tuple[str, str, float | None]], now: float | None = None) -> int:
    """:func:`move_deployments` for several dead nodes (id, reason, held since) at once: their
    deployments are ``lost`` in one bulk write and placed again in the same batches, so a
    tenth of the fleet dying costs about what one node holding as much does."""
    from dm import deployer

    now = time.time() if now is None else now
    # one mover per node: the detector that declared it dead, or the placement reconciler
    # finishing what that one left; two at once only race for the same writes
    tokens = {}
    for node_id, _, _ in dead:
        token = ports.fleet.try_lock(f"move:{node_id}", MOVE_LOCK_SECONDS)
        if token is not None:
            tokens[node_id] = token
    if not tokens:
        return 0
    ports.fleet.set_marks(k.MOVING, {n: repr(time.time() + MOVE_LOCK_SECONDS) for n in tokens})
    try:
        stopping: list[dict[str, Any]] = []
        active: list[dict[str, Any]] = []
        reasons: dict[str, str] = {}
        for node_id, reason, held_since in dead:
            if node_id not in tokens:
                continue
            docs = ports.store.active_on(node_id)
            if held_since is not None:
                docs = [d for d in docs if now >= held_since + float(d.get("keep_for") or 0.0)]
            stopping += [d for d in docs if d["state"] == D.STOPPING]
            active += [d for d in docs if d["state"] in ACTIVE]
            reasons.update({d["_id"]: reason for d in docs})
        if stopping:
            transition_many(ports, stopping, D.STOPPED, actor=Actor.CONTROL, reason="stopped",
                            each=[{"reason": f"stopped ({reasons[d['_id']]})"} for d in stopping])  # fmt: skip
        for node_id in tokens:
            ports.fleet.clear_allocations(node_id)
        # lost and placed again in one write each, in batches (one script, one bulk write, one
        # pipeline each); those that find no room are lost, and wait
        movers = set(tokens)

        def still_ours() -> bool:  # between batches: the locks held as long again, while they are ours
            for node_id, token in list(tokens.items()):
                if not ports.fleet.extend_lock(f"move:{node_id}", token, MOVE_LOCK_SECONDS):
                    log.warning("node-%s: another mover took over its deployments", node_id)
                    del tokens[node_id]
            ports.fleet.set_marks(k.MOVING, {n: repr(time.time() + MOVE_LOCK_SECONDS) for n in tokens})
            return bool(tokens)

        after = deployer.place_many(
            ports, active, lost={d["_id"]: reasons[d["_id"]] for d in active}, between=still_ours
        )
        return sum(1 for d in after if d["state"] not in ACTIVE or d.get("node") not in movers)
    finally:
        ports.fleet.set_marks(k.MOVING, {}, drop=list(tokens))
        for node_id, token in tokens.items():
            ports.fleet.unlock(f"move:{node_id}", token)
