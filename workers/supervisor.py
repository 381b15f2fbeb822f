"""The supervisor: one long-lived thread owns every algorithm process of a node.

Task threads fetch packages and hand ``start``/``kill`` orders over a queue; only
this thread spawns children, so ``PR_SET_PDEATHSIG`` (which fires when the
spawning *thread* exits) ties them to the agent's life. Each exit is noticed at
once and handled by the deployment's restart policy; every report to the registry
is a compare-and-set on the deployment's generation, and a refused report kills
the process it speaks for (the fence against running one deployment twice).

Reports go through an outbox that keeps them while the registry is out of reach.
When the lease lapses (this node cannot prove it still owns its algorithms) the
algorithms are killed, and each deployment is reported ``lost`` so it is placed
again; nothing is started until the lease is renewed.

Each process starts contained (``workers/containment/host.py``): in a cgroup of its own
(or the fallback's group), under its deployment's uid. The group is the unit: stop, kill
and fencing take every process in it, its leftovers die when the first process exits, and
a kill at its memory limit is reported ``out of memory (limit N MiB)``. A process that
cannot be started at all (E2BIG, a NUL byte, an unpack error) takes its restart policy's
next step like an exit, and finally ``failed`` with the cause.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dm import keys as k
from dm.control import Control
from dm.errors import DMError
from dm.lifecycle import DeploymentState as D
from dm.models import (
    LOST,
    RESTARTING,
    RUNNING,
    SCHEDULED,
    STOPPED,
    STOPPING,
    RestartPolicy,
)
from dm.package import unpack
from dm.registry import Doc
from dm.registry.base import find_in
from workers.containment import Group, User
from workers.containment import spawn as sp
from workers.containment.base import CPU_START_GRACE
from workers.containment.host import MEMORY_CHECK_INTERVAL, Host, describe_start_error
from workers.containment.usage import Meter
from workers.outbox import UNREACHABLE, Outbox
from workers.policy import Outcome, on_exit, on_start_failure
from workers.watchdog import FENCE_FRACTION, write_state

log = logging.getLogger(__name__)

#: seconds between SIGTERM and SIGKILL when stopping an algorithm
KILL_GRACE = 5.0
#: seconds between checks that each process still belongs to the current generation: against
#: the fleet's allocations of this node (one read), and the copies it no longer lists against
#: the registry
FENCE_CHECK_INTERVAL = 2.0
#: seconds between checks of every copy against the registry (the truth), whatever the fleet says
REGISTRY_CHECK_INTERVAL = 30.0
#: seconds before trying again a start that waits for the lease or the registry
START_RETRY = 0.5


@dataclass
class Proc:
    payload: dict[str, Any]
    #: the unpacked package; None when unpacking it failed (tried again at the next start)
    package: Path | None
    popen: subprocess.Popen[bytes] | None = None
    #: the cgroup (or fallback group) of the process now running, and whom it runs as
    group: Group | None = None
    user: User | None = None
    #: when the cpu quota applies (monotonic; None: applied, or none to apply)
    hold_cpu_at: float | None = None
    restarts: int = 0
    #: why it is being killed: "stop" (by request), "fence" (no longer ours), "shutdown",
    #: "lapse" (the lease lapsed: reported lost, to be placed again)
    killing: str | None = None
    kill_deadline: float = 0.0
    restart_at: float | None = None
    #: the registry state a start expects: scheduled, or restarting for a restart
    expect: str = SCHEDULED
    started: float = field(default_factory=time.time)

    @property
    def dep_id(self) -> str:
        return str(self.payload["id"])

    @property
    def generation(self) -> int:
        return int(self.payload["generation"])


class Supervisor(threading.Thread):
    def __init__(self, ctl: Control, node_id: str, fence_file: Path) -> None:
        super().__init__(name=f"dm-supervisor-{node_id}", daemon=True)
        self.ctl = ctl
        self.node_id = node_id
        self.home = ctl.settings.home
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.host = Host(ctl.settings, node_id)
        self.cache = self.host.cache
        self.work = self.host.work
        self._next_memory_check = 0.0
        self.meter = Meter(self.groups)
        self._next_usage = 0.0
        self._usage_shown = False
        self.orders: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.procs: dict[str, Proc] = {}
        self.stopped = threading.Event()
        self._next_fence_check = 0.0
        self._next_registry_check = 0.0
        #: the watchdog's state file: lease validity and the process groups to kill past it
        self.fence_file = fence_file  # from watchdog.state_file, made before the watchdog's fork
        self.valid_until = time.time() + ctl.settings.lease_ttl * FENCE_FRACTION
        #: when the lease was last seen lapsed (the watchdog killed everything then)
        self.lapsed_at = 0.0
        self._fence_lock = threading.Lock()
        self._write_fence()
        self.outbox = Outbox(ctl, node_id)
        self.host.announce(ctl)

    # -- called from other threads ------------------------------------------------

    def ensure_package(self, sha256: str) -> Path:
        """The unpacked package in the local cache, fetched from the registry once."""
        dest = self.cache / sha256
        if dest.is_dir():
            return dest
        return unpack(self.ctl.registry.fetch_archive(sha256), dest, sha256)

    def start_deployment(self, payload: dict[str, Any], package: Path | None, failure: str = "") -> None:
        """Start a deployment; with ``failure`` (its package could not be unpacked), go on
        with its restart policy as for a start that failed."""
        self.orders.put(("start", (payload, package, failure)))

    def kill_deployment(self, dep_id: str, generation: int, reason: str) -> None:
        self.orders.put(("kill", (dep_id, generation, reason)))

    def fence_all(self, reason: str, keep: dict[str, int] | None = None) -> None:
        """Kill every algorithm without a report: the registry has given them to other nodes;
        but those of ``keep`` (deployment -> generation), which the registry says are still ours."""
        self.orders.put(("fence_all", (reason, dict(keep or {}))))

    def lapse(self, reason: str) -> None:
        """Kill every algorithm and report each ``lost``: this node cannot prove it still owns them."""
        self.orders.put(("lapse", reason))

    def lapsed(self) -> bool:
        return time.time() > self.valid_until

    def shutdown(self, timeout: float = KILL_GRACE + 2) -> list[dict[str, Any]]:
        """Stop every algorithm and the thread; returns the payloads that were running."""
        done: queue.Queue[list[dict[str, Any]]] = queue.Queue()
        self.orders.put(("shutdown", done))
        try:
            return done.get(timeout=timeout)
        except queue.Empty:
            return []

    def renewed(self, valid_until: float) -> None:
        """The lease was renewed: the algorithms may run until ``valid_until``."""
        if self.lapsed():
            self.lapsed_at = time.time()
        self.valid_until = valid_until
        self._write_fence()

    def _write_fence(self) -> None:
        procs = list(self.procs.values())
        now_ = [p for p in procs if not keep_for(p)]
        pgids, cgroups, uids = self._fence_set(now_, list(self.host.leftovers))
        held = []
        for p in procs:
            if keep_for(p):
                h_pgids, h_cgroups, h_uids = self._fence_set([p], [])
                held.append({"keep_for": keep_for(p), "pgids": h_pgids, "cgroups": h_cgroups, "uids": h_uids})
        with self._fence_lock:
            write_state(self.fence_file, self.valid_until, pgids, cgroups, uids, held)

    @staticmethod
    def _fence_set(procs: list[Proc], leftovers: list[Group]) -> tuple[list[int], list[str], list[int]]:
        pgids = [p.popen.pid for p in procs if p.popen is not None]
        groups = [p.group for p in procs if p.group is not None] + leftovers
        cgroups = [f for g in groups for f in g.join_files()[:1]]
        # a uid of its own and no cgroup: the watchdog kills by uid
        uids = [p.user.uid for p in procs if p.user is not None and p.user.own and p.group is not None
                and not p.group.join_files()]  # fmt: skip
        return pgids, cgroups, uids

    def groups(self) -> dict[str, Group]:
        """The group of each deployment running here (for the usage sampler: any thread)."""
        return {p.dep_id: p.group for p in list(self.procs.values()) if p.group is not None and p.popen is not None}

    # -- the supervisor thread ----------------------------------------------------

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                # poll often only while there are processes to watch or reports to retry
                busy = bool(self.procs) or len(self.outbox) > 0
                kind, arg = self.orders.get(timeout=0.05 if busy else 0.5)
                self._order(kind, arg)
            except queue.Empty:
                pass
            except Exception:
                log.exception("supervisor order failed")
            try:
                self._tick()
            except Exception:
                log.exception("supervisor check failed")

    def _order(self, kind: str, arg: Any) -> None:
        if kind == "start":
            payload, package, failure = arg
            new = Proc(payload, package, restarts=int(payload.get("restarts", 0)))
            held = self.procs.get(new.dep_id)
            if held is not None and held.generation >= new.generation:
                # an order sent twice (a resend after the start timeout, a redelivery): one copy
                # runs; a second start would lose track of the first
                log.warning("deployment %s gen %s is already here: order ignored", new.dep_id, new.generation)
                return
            if held is not None:  # an older generation of it still here: gone before the new one starts
                self._kill(held, "fence", grace=0.0)
                if held.popen is not None:
                    try:
                        held.popen.wait(timeout=KILL_GRACE)
                    except subprocess.TimeoutExpired:  # the start timeout sends the order again
                        log.warning("deployment %s gen %s outlives SIGKILL: gen %s not started", held.dep_id,
                                    held.generation, new.generation)  # fmt: skip
                        return
                    self._exited(held)
            if failure:
                self._start_failed(new, failure)
            else:
                self._start(new)
        elif kind == "kill":
            dep_id, generation, reason = arg
            proc = self.procs.get(dep_id)
            if proc is not None and proc.generation == generation:
                self._kill(proc, "stop")
            elif proc is None:  # not here (already exited): just record it
                self.outbox.send(dep_id, STOPPED, expect=[STOPPING], generation=generation, reason=reason)
        elif kind == "fence_all":
            reason, keep = arg if isinstance(arg, tuple) else (arg, {})
            log.warning("node-%s fences itself: %s", self.node_id, reason)
            for proc in list(self.procs.values()):
                if keep.get(proc.dep_id) != proc.generation:
                    self._kill(proc, "fence", grace=0.0)
        elif kind == "lapse":
            self._lapse(arg)
        elif kind == "shutdown":
            payloads = [p.payload for p in self.procs.values() if p.killing is None]
            for proc in list(self.procs.values()):
                self._kill(proc, "shutdown")
            deadline = time.monotonic() + KILL_GRACE + 1
            while self.procs and time.monotonic() < deadline:
                self._tick()
                time.sleep(0.02)
            self.outbox.retry_at = 0.0  # one last try at what is kept
            self.outbox.flush()
            if not self.procs:
                self.host.close()
            self.stopped.set()
            arg.put(payloads)

    def _start(self, proc: Proc) -> None:
        """Spawn (from this thread only) and report ``running``, or kill if the report is refused."""
        expect = [proc.expect]
        current: Doc | None = None
        wait = "the lease was not renewed in time" if self.lapsed() else ""
        try:
            if not wait:
                current = self._as_sent(proc) or self.ctl.registry.deployments.find_one({"_id": proc.dep_id})
        except UNREACHABLE as exc:
            wait = f"the registry is out of reach ({exc})"
        if wait:  # try again soon; the lease and the registry decide then
            log.info("start of %s gen %s waits: %s", proc.dep_id, proc.generation, wait)
            proc.restart_at = time.monotonic() + START_RETRY
            self.procs[proc.dep_id] = proc
            return
        if current is None or current["generation"] != proc.generation or current["state"] not in expect:
            log.info("not starting %s gen %s: the registry has moved on", proc.dep_id, proc.generation)
            if self.procs.get(proc.dep_id) is proc:
                del self.procs[proc.dep_id]
            return
        log_path = self.logs / f"{proc.dep_id}.log"
        try:
            popen = self._spawn(proc, log_path)
        except (OSError, ValueError, subprocess.SubprocessError, DMError) as exc:
            self._release(proc)
            what = "cannot unpack the package" if proc.package is None else "cannot start"
            self._start_failed(proc, f"{what} on node-{self.node_id}: {describe_start_error(exc)}", current)
            return
        proc.started = time.time()
        proc.restart_at = None
        self.procs[proc.dep_id] = proc
        self._write_fence()

        def refused(doc: Doc | None) -> None:
            if doc is None and proc.popen is popen:
                log.warning("report for %s gen %s refused: killing pid %s", proc.dep_id, proc.generation, popen.pid)
                self._kill(proc, "fence", grace=0.0)

        self.outbox.send(
            proc.dep_id,
            RUNNING,
            expect=expect,
            generation=proc.generation,
            reason=f"started on node-{self.node_id}" + (f" (restart {proc.restarts})" if proc.restarts else ""),
            then=refused,
            current=current,  # as read just now: the report's compare-and-set needs no second read
            pid=popen.pid,
            restarts=proc.restarts,
            log=str(log_path),
        )

    def _spawn(self, proc: Proc, log_path: Path) -> subprocess.Popen[bytes]:
        """Start the process in a new group, as its user; raises what stops it from starting."""
        if proc.package is None:  # its unpack failed before: try again (a restart)
            proc.package = self.ensure_package(proc.payload["sha256"])
        popen, proc.group, proc.user = self.host.launch(proc.payload, proc.package, proc.restarts, log_path)
        proc.popen = popen
        proc.hold_cpu_at = time.monotonic() + CPU_START_GRACE
        return popen

    def _start_failed(self, proc: Proc, reason: str, current: Doc | None = None) -> None:
        """A process that could not be started: the restart policy's next step, finally ``failed``."""
        log.warning("deployment %s gen %s: %s", proc.dep_id, proc.generation, reason)
        if self.procs.get(proc.dep_id) is proc:
            del self.procs[proc.dep_id]
        proc.popen = None
        policy = RestartPolicy.from_dict(proc.payload["restart"])
        out = on_start_failure(policy, proc.restarts, reason, D(proc.expect))
        self._report(proc, out, current=current)

    def _as_sent(self, proc: Proc) -> Doc | None:
        """The deployment as the control plane sent it, when the order is fresh: then nothing
        can have given it to another node yet (that takes the start timeout, or this node's
        lease lapsing, which stops all starts here), and the read before the start is saved.
        The ``running`` report is still a compare-and-set: if the deployment moved on (a
        stop), it is refused and the process killed. None: read the registry."""
        p = proc.payload
        if proc.expect != SCHEDULED or "rev" not in p or "sent_at" not in p or "request_id" not in p:
            return None
        age = time.time() - float(p["sent_at"])
        if not 0 <= age < self.ctl.settings.start_timeout / 3:  # old, or a clock behind the sender's
            return None
        return {
            "_id": proc.dep_id, "request_id": p["request_id"], "algorithm": p["algorithm"], "state": SCHEDULED,
            "node": self.node_id, "generation": proc.generation, "rev": int(p["rev"]), "exit_code": None,
        }  # fmt: skip

    def _kill(self, proc: Proc, why: str, grace: float = KILL_GRACE) -> None:
        if proc.popen is None or proc.popen.poll() is not None:
            proc.killing = why
            proc.restart_at = None
            self._exited(proc)
            return
        if proc.killing is None:
            proc.killing = why
            proc.kill_deadline = time.monotonic() + grace
            self._signal(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)

    def _signal(self, proc: Proc, sig: int) -> None:
        """Signal the whole deployment: its process group and every process of its group."""
        if proc.popen is not None:
            _signal_group(proc.popen.pid, sig)
        if proc.group is not None:
            if sig == signal.SIGKILL:
                proc.group.kill()
            else:
                proc.group.signal(sig)

    def _lapse(self, reason: str) -> None:
        # a deployment that asked to keep running cut off ([disconnect] keep_for) goes that much later
        late = time.time() - self.valid_until
        running = [p for p in self.procs.values() if p.popen is not None and p.killing is None and late > keep_for(p)]
        if running:
            log.warning("node-%s kills its %d algorithm(s): %s", self.node_id, len(running), reason)
        for proc in running:
            self._kill(proc, "lapse", grace=0.0)

    def _tick(self) -> None:
        self.outbox.flush()
        if self.lapsed():  # the watchdog kills them too; this thread reports them lost
            self._lapse("its lease was not renewed in time")
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.popen is None:
                if proc.restart_at is not None and now >= proc.restart_at:
                    self._start(proc)
                continue
            if proc.popen.poll() is not None:
                self._exited(proc)
            elif proc.killing is not None and now >= proc.kill_deadline:
                self._signal(proc, signal.SIGKILL)
                proc.kill_deadline = now + 1.0
            elif proc.hold_cpu_at is not None and now >= proc.hold_cpu_at and proc.group is not None:
                proc.hold_cpu_at = None
                try:
                    proc.group.hold_cpu()
                except OSError as exc:
                    log.warning("deployment %s: cannot apply its cpu quota: %s", proc.dep_id, exc)
        if now >= self._next_usage:
            self._next_usage = now + self.ctl.settings.metrics_interval
            self._publish_usage()
        if now >= self._next_memory_check:
            self._next_memory_check = now + MEMORY_CHECK_INTERVAL
            self._check_memory()
        if now >= self._next_fence_check:
            self._next_fence_check = now + FENCE_CHECK_INTERVAL
            full = now >= self._next_registry_check
            if full:
                self._next_registry_check = now + REGISTRY_CHECK_INTERVAL
            self._check_ownership(full)
            if self.host.leftovers:
                self.host.sweep()

    def _check_memory(self) -> None:
        """Where no kernel holds a group to its memory limit (the fallback), kill it past it."""
        for proc in list(self.procs.values()):
            group = proc.group
            if proc.popen is not None and proc.killing is None and group is not None and not group.check():
                log.warning("deployment %s is past its memory limit (%g MiB): killing it", proc.dep_id,
                            group.limits.memory_mib)  # fmt: skip
                self._signal(proc, signal.SIGKILL)

    def _publish_usage(self) -> None:
        """Each deployment's cpu and memory use, in the node's usage hash (one round trip)."""
        use = self.meter.read()
        if not use and not self._usage_shown:
            return
        key = k.USAGE.format(self.node_id)
        ts = round(time.time(), 3)
        try:
            pipe = self.ctl.redis.pipeline(transaction=True)
            pipe.delete(key)
            if use:
                pipe.hset(key, mapping={d: json.dumps({**u.to_dict(), "ts": ts}) for d, u in use.items()})
                pipe.expire(key, max(3, int(self.ctl.settings.metrics_interval * 3)))
            pipe.execute()
            self._usage_shown = bool(use)
        except UNREACHABLE as exc:
            log.debug("usage not published: %s", exc)

    def _release(self, proc: Proc) -> None:
        group, proc.group = proc.group, None
        self.host.release(proc.dep_id, group)

    def _exited(self, proc: Proc) -> None:
        code = proc.popen.returncode if proc.popen is not None else None
        oom = False
        if proc.popen is not None:
            _signal_group(proc.popen.pid, signal.SIGKILL)  # leftovers of its process group
            if proc.group is not None:
                proc.group.kill()  # and of its cgroup: a double-fork goes with the rest
                oom = proc.group.oom_killed()
            killed = proc.popen.returncode == -signal.SIGKILL and proc.started < self.lapsed_at
            if proc.killing is None and (self.lapsed() or killed):
                proc.killing = "lapse"  # the watchdog killed it while this thread could not look
        limits = proc.group.limits if proc.group is not None else None
        self._release(proc)
        proc.popen = None
        if self.procs.get(proc.dep_id) is proc:
            del self.procs[proc.dep_id]
        self._write_fence()
        why = limits.describe_oom() if oom and limits is not None else ""
        out = on_exit(RestartPolicy.from_dict(proc.payload["restart"]), code, proc.restarts, proc.killing, why)
        if out is None:  # fenced or shutting down: the registry is told elsewhere
            return
        if out.state == LOST:  # killed before its lease expired: placed again, here or elsewhere
            out = replace(out, reason=f"node-{self.node_id} could not renew its lease and killed its copy")
        self._report(proc, out)

    def _report(self, proc: Proc, out: Outcome, current: Doc | None = None) -> None:
        """Send what an exit or a failed start means (workers/policy.py) through the outbox; a
        restart is scheduled once the registry took the ``restarting`` report."""
        dep_id, gen = proc.dep_id, proc.generation
        fields: dict[str, Any] = {"pid": None}
        if out.exit_code is not None and out.state != STOPPED:
            fields["exit_code"] = out.exit_code
        elif out.state == STOPPED:
            fields = {"exit_code": out.exit_code}
        if current is not None:
            fields["current"] = current
        then = None
        if out.state == RESTARTING:
            proc.restarts = out.restarts
            fields["restarts"] = out.restarts
            delay = out.delay

            def then(moved: Doc | None) -> None:
                if moved is not None and dep_id not in self.procs:
                    proc.restart_at = time.monotonic() + delay
                    proc.expect = RESTARTING
                    self.procs[dep_id] = proc

        self.outbox.send(dep_id, out.state, expect=list(out.expect), generation=gen, reason=out.reason, then=then,
                         **fields)  # fmt: skip

    def _check_ownership(self, full: bool = True) -> None:
        """Kill processes whose deployment has moved to another generation or node. Unless
        ``full``, only those the fleet no longer allocates on this node are looked up in the
        registry (a move releases the allocation): the read per check is one of Redis, not one
        of MongoDB per copy."""
        ours = {p.dep_id: p for p in self.procs.values() if p.killing is None}
        if not full and ours:  # the fleet lists what is placed here, and in which generation
            try:
                listed = placed_here(self.ctl.redis.hgetall(k.ALLOC.format(self.node_id)))
                ours = {d: p for d, p in ours.items() if listed.get(d, -1) not in (p.generation, None)}
            except Exception as exc:  # Redis away: the lease decides fencing meanwhile
                log.warning("ownership check skipped: %s", exc)
                return
        if not ours:
            return
        try:
            docs = find_in(self.ctl.registry.deployments, ours, {"generation": 1, "node": 1, "state": 1})
            current = {d["_id"]: d for d in docs}
        except Exception as exc:  # registry away: the lease, not the registry, decides fencing
            log.warning("ownership check skipped: %s", exc)
            return
        for dep_id, proc in ours.items():
            doc = current.get(dep_id)
            if doc is None or doc["generation"] != proc.generation or doc.get("node") != self.node_id:
                log.warning("deployment %s gen %s is no longer ours: killing it", dep_id, proc.generation)
                self._kill(proc, "fence", grace=0.0)


def placed_here(allocations: dict[str, str]) -> dict[str, int | None]:
    """Deployment id -> the generation the fleet's allocation of a node names (None: not named),
    from the node's allocation hash."""
    out: dict[str, int | None] = {}
    for dep_id, raw in allocations.items():
        try:
            gen = json.loads(raw).get("gen")
        except (ValueError, AttributeError):
            gen = None
        out[dep_id] = int(gen) if isinstance(gen, int | float) else None
    return out


def keep_for(proc: Proc) -> float:
    """Seconds the deployment keeps running on a cut-off node past the lease's fence."""
    return float(proc.payload.get("keep_for") or 0.0)


def command_line(command: list[str], package: Path) -> list[str]:
    """The command with ``python`` as this interpreter and package files as absolute paths."""
    return sp.command_line(command, package)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
