"""Tick every ``interval`` seconds (default 1) until SIGTERM/SIGINT, then exit 0.

With a ``ledger`` arg (a file path) it appends ``start <id> <gen> <pid> <time>`` when it
starts, ``tick …`` after each interval, and ``stop <id> <gen> <pid> <time>`` when signalled. Each line is one O_APPEND
write followed by fsync, so several instances sharing a ledger interleave by line; tests
read it to prove a deployment never runs twice at once.
"""

import json
import os
import signal
import time


class Stop(Exception):
    """Raised by the signal handler to leave the loop (and any sleep) at once."""


def on_signal(signum: int, frame: object) -> None:
    raise Stop


def record(ledger: str | None, event: str, sync: bool = True) -> None:
    if not ledger:
        return
    deployment = os.environ.get("DM_DEPLOYMENT_ID", "-")
    generation = os.environ.get("DM_GENERATION", "-")
    line = f"{event} {deployment} {generation} {os.getpid()} {time.time()}\n"
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    args = json.loads(os.environ.get("DM_ARGS") or "{}")
    interval = float(args.get("interval", 1))
    ledger = args.get("ledger")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        record(ledger, "start")
        print(f"service: started pid={os.getpid()} interval={interval}", flush=True)
        tick = 0
        while True:
            time.sleep(interval)
            tick += 1
            print(f"service: tick {tick}", flush=True)
            record(ledger, "tick", sync=False)  # proof of life: two instances must never tick at once
    except Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop line, even if signalled twice
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        record(ledger, "stop")
        print("service: stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
