"""``dm watch``: a view (``dm status``) redrawn every ``interval`` seconds until Ctrl-C.

On a terminal each frame replaces the last one (cursor home, clear); piped to a file
or another program, frames follow each other, each under its own header line. A frame
that cannot be read (the servers are down) shows the error, and the next one tries again.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

#: ANSI: cursor home, then clear the screen
CLEAR = "\x1b[H\x1b[2J"


def header(title: str, interval: float, now: float | None = None) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if now is None else now))
    return f"{title} every {interval:g}s at {stamp} (Ctrl-C quits)"


def frame(render: Callable[[], str]) -> str:
    """The rendered view, or the error that kept it from rendering."""
    try:
        return render()
    except Exception as exc:  # any failure of one frame: show it and try again at the next
        return f"dm: cannot read the status ({type(exc).__name__}: {exc}); retrying\n"


def run(
    render: Callable[[], str],
    interval: float = 1.0,
    *,
    title: str = "dm status",
    out: TextIO | None = None,
    frames: int | None = None,
) -> int:
    """Redraw ``render()`` every ``interval`` seconds; returns 0 on Ctrl-C or SIGTERM."""
    out = out or sys.stdout
    tty = out.isatty()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    shown = 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            body = frame(render)
            top = header(title, interval)
            # one write per frame, so a terminal never shows half of one
            out.write((CLEAR if tty else ("\n" if shown else "")) + top + "\n\n" + body)
            out.flush()
            shown += 1
            if frames is not None and shown >= frames:
                break
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        _restore(previous)
    return 0


def _restore(previous: dict[signal.Signals, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
