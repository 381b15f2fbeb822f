"""``dm bridge`` / ``python -m bridge``: the request consumer and the event publisher, together.

The consumer runs in the main thread and the publisher in another; SIGTERM or SIGINT
stops both: the batch under way is finished and committed, the consumer leaves its
group (its partitions move at once) and the events lease is released.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from bridge.broker import Backoff, describe
from bridge.consumer import RequestConsumer
from bridge.intake import Intake
from bridge.publisher import EventPublisher
from bridge.settings import BridgeSettings
from dm.control import Control
from dm.errors import DMError
from dm.outage import is_outage
from dm.settings import Settings

log = logging.getLogger("dm.bridge")


class Bridge:
    def __init__(self, ctl: Control, settings: BridgeSettings) -> None:
        settings.require_bootstrap()
        self.ctl, self.settings = ctl, settings
        self.stop = threading.Event()
        self.publisher = EventPublisher(ctl, settings, self.stop) if settings.publish_events else None
        self.consumer = RequestConsumer(settings, Intake(ctl, settings), self.stop, self.publisher)

    def run(self) -> None:
        """Run until :attr:`stop` is set (or a signal sets it)."""
        s = self.settings
        log.info(
            "bridge: %s -> deploy, events -> %s; Kafka %s (%s), group %s",
            s.requests_topic, s.events_topic if self.publisher else "(not published)", s.bootstrap,
            s.security.describe(), s.group,
        )  # fmt: skip
        self._wait_registry()
        thread = None
        if self.publisher is not None:
            thread = threading.Thread(target=self.publisher.run, name="bridge-events", daemon=True)
            thread.start()
        try:
            self.consumer.run()
        finally:
            self.stop.set()
            if thread is not None:
                thread.join(timeout=s.kafka_timeout + s.lock_ttl)
        log.info("bridge: stopped")

    def _wait_registry(self) -> None:
        backoff = Backoff(self.settings.backoff_first, self.settings.backoff_max)
        while not self.stop.is_set():
            try:
                self.ctl.registry.ping()
                self.ctl.redis.ping()
                self.ctl.registry.ensure_indexes()
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                delay = backoff.next()
                log.warning("bridge: MongoDB or Redis is unavailable (%s); retrying in %.1fs", describe(exc), delay)
                self.stop.wait(delay)

    def install_signals(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("bridge: %s: stopping after the batch under way", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dm bridge", description="Run the Kafka bridge: requests in, events out.")
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: DM_KAFKA_BOOTSTRAP or the `dm up` stack)")
    p.add_argument("--group", help=f"consumer group (default: DM_BRIDGE_GROUP or {BridgeSettings.group})")
    p.add_argument("--no-events", action="store_true", help="do not publish deployment events")
    p.add_argument("--loglevel", default="INFO")


def run(args: argparse.Namespace) -> int:
    """Run a bridge from parsed arguments; returns an exit code (1: a configuration error)."""
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s bridge %(levelname)s %(message)s")
    try:
        settings = BridgeSettings.from_env(
            bootstrap=args.bootstrap, group=args.group, publish_events=False if args.no_events else None
        )
        logging.getLogger("kafka").setLevel(settings.kafka_log_level.upper())
        ctl = Control(Settings.from_env())
        bridge = Bridge(ctl, settings)
    except DMError as exc:
        log.error("bridge: %s", exc)
        return 1
    bridge.install_signals()
    bridge.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse(argv))
