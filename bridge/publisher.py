"""Deployment events from the registry to the events topic, by the one bridge holding the lease.

The relay (:mod:`dm.relay`) numbers the events it copies into ``events`` (``seq``, in the
registry's order, so per deployment in ``rev`` order). Each round the publisher reads the
events after its saved position, up to the relay's mark, sends each keyed by deployment
id (so one deployment's events share a partition and keep their order), flushes, and
only then saves the new position: one small write per round, none per event. A crash
after the flush and before the save sends those events again after the restart:
consumers see each (deployment_id, rev) at least once, in order.

Only the holder of a Redis lease (a key with a TTL that it renews) publishes; when it
dies, the lease expires and another bridge takes over from the saved position.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka import KafkaProducer

from bridge import broker
from bridge.broker import KAFKA_OUTAGES, Backoff, describe
from bridge.intake import OUTAGES
from bridge.messages import Event
from bridge.settings import BridgeSettings
from dm import constants as c
from dm.control import Control
from dm.lease import Lease
from dm.registry import EVENT_SPAN

log = logging.getLogger("dm.bridge")


class EventPublisher:
    def __init__(self, ctl: Control, settings: BridgeSettings, stop: threading.Event) -> None:
        self.ctl, self.s, self.stop = ctl, settings, stop
        self.lease = Lease(ctl.redis, settings.events_lock, settings.lock_ttl)
        self.producer: KafkaProducer | None = None
        self.published = 0

    def run(self) -> None:
        """Publish until ``stop`` is set, while holding the lease; wait out outages."""
        backoff = Backoff(self.s.backoff_first, self.s.backoff_max)
        try:
            while not self.stop.is_set():
                try:
                    count = self._round()
                except OUTAGES as exc:
                    delay = backoff.next()
                    log.warning("events: MongoDB or Redis is unavailable (%s); retrying in %.1fs", describe(exc), delay)
                    self.stop.wait(delay)
                    continue
                except KAFKA_OUTAGES as exc:
                    self._close()
                    self.lease.release()  # a bridge that can reach Kafka may take over
                    delay = backoff.next()
                    why = describe(exc)
                    log.warning("events: cannot publish to Kafka (%s); lease released, retrying in %.1fs", why, delay)
                    self.stop.wait(delay)
                    continue
                except Exception:  # a bug: say so loudly, and go on (the position was not saved)
                    self._close()
                    delay = backoff.next()
                    log.exception("events: unexpected error; retrying in %.1fs", delay)
                    self.stop.wait(delay)
                    continue
                backoff.reset()
                if count == 0:
                    self.stop.wait(self.s.publish_idle)
        finally:
            self._close()
            self.lease.release()

    def _round(self) -> int:
        """One round of publishing; returns how many events it settled (0: nothing to do)."""
        if self.producer is None:  # Kafka first: a lease is only worth holding with a way to publish
            if not broker.connect(self.s, self.stop, "events"):
                return -1
            self.producer = broker.producer(self.s)
        was_held = self.lease.held
        if not self.lease.hold():
            if was_held:
                log.warning("events: lost the lease %s (expired, or Redis lost it); waiting for it", self.s.events_lock)
            self.stop.wait(self.s.lock_ttl / 3)
            return -1
        if not was_held:
            log.info("events: this bridge holds the lease; publishing to %s", self.s.events_topic)
        registry = self.ctl.registry
        start = self.position()
        mark = registry.events_mark()
        if mark <= start:
            return 0
        mark = min(mark, start + EVENT_SPAN)  # the numbers are looked up, a span at a time (dm.registry)
        events = registry.events_between(start, mark, {}, self.s.publish_batch)
        futures = []
        for doc in events:
            try:
                event = Event.from_doc(doc)
            except (KeyError, TypeError, ValueError) as exc:  # not written by dm: skip, never block on it
                log.error("events: skipping malformed event %r: %s", doc.get("_id"), describe(exc))
                continue
            futures.append(self.producer.send(self.s.events_topic, key=event.key(), value=event.encode()))
        if futures:
            self.producer.flush(timeout=self.s.kafka_timeout)
            for future in futures:
                future.get(timeout=self.s.kafka_timeout)  # raises if that record failed
        # all up to the mark when the batch was not full (the rest up to it matched nothing)
        done = int(events[-1]["_id"]) if len(events) == self.s.publish_batch else mark
        if not self.lease.hold():  # another bridge may have taken over: do not move its position back
            return -1
        registry.db[c.META].update_one(
            {"_id": self.position_id}, {"$set": {"seq": done, "at": time.time()}}, upsert=True
        )
        self.published += len(futures)
        log.debug("events: published %d (up to seq %d)", len(futures), done)
        return max(len(events), 1)

    @property
    def position_id(self) -> str:
        return f"publisher:{self.s.events_topic}"

    def position(self) -> int:
        """The ``seq`` of the last event published to this topic."""
        doc = self.ctl.registry.db[c.META].find_one({"_id": self.position_id}, {"seq": 1})
        return int((doc or {}).get("seq") or 0)

    def _close(self) -> None:
        if self.producer is not None:
            producer, self.producer = self.producer, None
            broker.quietly(lambda: producer.close(timeout=0))
