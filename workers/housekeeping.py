"""A node's housekeeping: logs rotated by size, and what finished deployments left pruned.

- :func:`rotate`: an algorithm's log past its cap (default 10 MiB, ``DM_LOG_MAX_SIZE``, or
  per algorithm ``[logs] max_size`` in ``algorithm.toml``) is copied to ``<log>.1`` (older
  copies shift to ``.2`` ... up to ``keep``, default 3) and truncated in place. The algorithm
  keeps writing through its own descriptor, opened ``O_APPEND``, so its next line lands at
  the start of the emptied file; a line written between the copy and the truncation is lost.
- :func:`prune`: logs, work dirs and unpacked packages not touched for ``DM_RETENTION``
  (default 7 days), of deployments that are finished or gone from the registry, and of
  packages no active deployment uses. Several local nodes share one ``DM_HOME``, so
  "finished" is asked of the registry, never judged from this node's processes alone.

:class:`Housekeeper` runs both from one thread of the agent: rotation every
:data:`ROTATE_INTERVAL` seconds, pruning every ``DM_RETENTION_INTERVAL``.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dm.models import FINAL_STATES, STATES
from dm.settings import Settings

log = logging.getLogger("dm.node")

#: seconds between two looks at the running algorithms' log sizes
ROTATE_INTERVAL = 2.0
#: seconds an unpack's temp dir (``cache/.<sha>.*``) may live: one older was left by a crash
TEMP_TTL = 3600.0
#: the states of deployments not finished (queried through the state index)
UNFINISHED = [s for s in STATES if s not in FINAL_STATES]
#: the name of a log of a deployment, and of its rotated copies (``<id>.log.1``)
LOG_SUFFIX = ".log"

#: given deployment ids, those still not finished (anywhere); given sha256s, those in use
Asker = Callable[[list[str]], set[str]]


def rotate(path: Path, max_size: int, keep: int) -> bool:
    """Rotate ``path`` when it is over ``max_size`` bytes; True if it was."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_size:
        return False
    copies = [path.with_name(f"{path.name}.{i}") for i in range(1, keep + 1)]
    for older, newer in reversed(list(itertools.pairwise(copies))):
        if older.exists():
            os.replace(older, newer)
    if copies:
        shutil.copyfile(path, copies[0])
        copies[0].chmod(path.stat().st_mode & 0o777)
    os.truncate(path, 0)
    for stale in path.parent.glob(f"{path.name}.*"):  # copies past a ``keep`` that was lowered
        if stale.name.rpartition(".")[2].isdigit() and int(stale.name.rpartition(".")[2]) > keep:
            stale.unlink(missing_ok=True)
    return True


def log_limits(package: Path | None, settings: Settings) -> tuple[int, int]:
    """(max_size, keep) of an algorithm's log: its ``[logs]`` table, else the node's settings."""
    table: dict[str, Any] = {}
    if package is not None:
        try:
            table = tomllib.loads((package / "algorithm.toml").read_text()).get("logs") or {}
        except (OSError, ValueError):
            table = {}
    return int(table.get("max_size", settings.log_max_size)), int(table.get("keep", settings.log_keep))


def mark_used(package: Path) -> None:
    """Note that a cached package was just used, so pruning counts its age from now."""
    try:
        os.utime(package)
    except OSError:
        pass


def _age_ok(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _dep_id(log_name: str) -> str:
    return log_name.partition(LOG_SUFFIX)[0]


def prune(
    home: Path,
    retention: float,
    still_active: Asker,
    in_use: Asker,
    now: float | None = None,
) -> dict[str, int]:
    """Delete under ``home`` what finished deployments left and no one touched for ``retention`` s.

    ``still_active(ids)``: those of the deployment ids that are not finished (asked of the
    registry); ``in_use(shas)``: those of the packages an unfinished deployment uses.
    """
    now = time.time() if now is None else now
    cutoff = now - retention
    logs, work, cache = home / "logs", home / "work", home / "cache"
    old_logs = [p for p in _entries(logs) if LOG_SUFFIX in p.name and _age_ok(p, cutoff)]
    old_work = [p for p in _entries(work) if p.is_dir() and _age_ok(p, cutoff)]
    candidates = sorted({_dep_id(p.name) for p in old_logs} | {p.name for p in old_work})
    active = still_active(candidates) if candidates else set()
    done = {"logs": 0, "work": 0, "cache": 0}
    for path in old_logs:
        if _dep_id(path.name) not in active:
            path.unlink(missing_ok=True)
            done["logs"] += 1
    for path in old_work:
        if path.name not in active:
            shutil.rmtree(path, ignore_errors=True)
            done["work"] += 1
    entries = [p for p in _entries(cache) if p.is_dir()]
    temps = [p for p in entries if p.name.startswith(".") and _age_ok(p, now - TEMP_TTL)]
    old_packages = [p for p in entries if not p.name.startswith(".") and _age_ok(p, cutoff)]
    used = in_use([p.name for p in old_packages]) if old_packages else set()
    for path in [*temps, *(p for p in old_packages if p.name not in used)]:
        shutil.rmtree(path, ignore_errors=True)
        done["cache"] += 1
    return done


def _entries(directory: Path) -> Iterable[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


class Housekeeper(threading.Thread):
    """Rotation and pruning for one node agent, from one daemon thread."""

    def __init__(self, supervisor: Any, settings: Settings) -> None:
        super().__init__(name=f"dm-housekeeping-{supervisor.node_id}", daemon=True)
        self.supervisor, self.settings = supervisor, settings
        self.stopped = threading.Event()
        self._limits: dict[Path | None, tuple[int, int]] = {}
        self._next_prune = time.monotonic() + min(settings.retention_interval, 10.0)

    def run(self) -> None:
        while not self.stopped.wait(ROTATE_INTERVAL):
            try:
                self.rotate_running()
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + self.settings.retention_interval
                    pruned = self.prune_once()
                    if any(pruned.values()):
                        log.info("node-%s pruned %s", self.supervisor.node_id, pruned)
            except Exception as exc:  # an outage of the registry, a file gone meanwhile: next round
                log.warning("housekeeping of node-%s: %s", self.supervisor.node_id, exc)

    def rotate_running(self) -> None:
        for proc in list(self.supervisor.procs.values()):
            package = getattr(proc, "package", None)
            if package not in self._limits:
                self._limits[package] = log_limits(package, self.settings)
            max_size, keep = self._limits[package]
            if rotate(self.supervisor.logs / f"{proc.dep_id}{LOG_SUFFIX}", max_size, keep):
                node = self.supervisor.node_id
                log.info("node-%s rotated the log of %s (past %d bytes)", node, proc.dep_id, max_size)

    def prune_once(self, now: float | None = None) -> dict[str, int]:
        deployments = self.supervisor.ctl.registry.deployments
        local = set(self.supervisor.procs)

        def still_active(ids: list[str]) -> set[str]:
            found = deployments.find({"_id": {"$in": ids}, "state": {"$in": UNFINISHED}}, {"_id": 1})
            return local | {d["_id"] for d in found}

        def in_use(shas: list[str]) -> set[str]:
            here = {Path(str(p.package)).name for p in list(self.supervisor.procs.values())}
            for state in UNFINISHED:  # one equality each: the state index serves it
                found = deployments.find({"state": state, "sha256": {"$in": shas}}, {"sha256": 1})
                here |= {d["sha256"] for d in found}
            return here

        return prune(self.supervisor.home, self.settings.retention, still_active, in_use, now)

    def stop(self) -> None:
        self.stopped.set()


def start(supervisor: Any, settings: Settings) -> Housekeeper:
    """Start the housekeeping thread of a node agent (workers/agent.py calls it)."""
    keeper = Housekeeper(supervisor, settings)
    keeper.start()
    return keeper
