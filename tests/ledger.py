"""Reads the ledger the `service` example writes, to prove no deployment ran twice at once."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Instance:
    deployment: str
    generation: int
    pid: int
    start: float
    last_seen: float


def instances(ledger: Path) -> dict[str, list[Instance]]:
    """Every instance of every deployment, in order of start."""
    by_pid: dict[int, Instance] = {}
    for line in ledger.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        event, dep, gen, pid, t = parts[0], parts[1], int(parts[2]), int(parts[3]), float(parts[4])
        inst = by_pid.get(pid)
        if event == "start" or inst is None:
            by_pid[pid] = inst = Instance(dep, gen, pid, t, t)
        inst.last_seen = max(inst.last_seen, t)
    out: dict[str, list[Instance]] = defaultdict(list)
    for inst in sorted(by_pid.values(), key=lambda i: i.start):
        out[inst.deployment].append(inst)
    return out


def overlaps(ledger: Path) -> list[tuple[Instance, Instance]]:
    """Pairs of instances of one deployment where the older was seen alive after the newer started."""
    found = []
    for runs in instances(ledger).values():
        for i, later in enumerate(runs):
            found += [(earlier, later) for earlier in runs[:i] if earlier.last_seen > later.start]
    return found
