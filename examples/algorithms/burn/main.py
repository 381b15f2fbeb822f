"""Keep about ``share`` (default 0.3) of one core busy until SIGTERM, or for ``seconds``.

Busy-loops in 10 ms slices and sleeps the rest, so the duty cycle is ``share``.
"""

import json
import os
import signal
import sys
import time

SLICE = 0.01  # seconds of busy loop per cycle

stopping = False


def on_signal(signum: int, frame: object) -> None:
    global stopping
    stopping = True


def main() -> int:
    args = json.loads(os.environ.get("DM_ARGS") or "{}")
    share = args.get("share", 0.3)
    seconds = args.get("seconds")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        print(f"burn: 'share' must be a number in (0, 1], got {share!r}", file=sys.stderr, flush=True)
        return 2
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
        print(f"burn: 'seconds' must be a number, got {seconds!r}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"burn: share={share} seconds={seconds} pid={os.getpid()}", flush=True)
    idle = SLICE * (1 - share) / share
    end = time.monotonic() + seconds if seconds is not None else float("inf")
    while not stopping and time.monotonic() < end:
        busy_until = time.monotonic() + SLICE
        while time.monotonic() < busy_until:
            pass
        if idle > 0:
            time.sleep(idle)
    print("burn: stopped" if stopping else "burn: done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
