"""Deployment events from the registry to the events topic, by the one bridge holding the lease.

Each round: read the oldest unpublished events, let the :class:`Sequencer` order them
(per deployment by rev, no gaps), send each keyed by deployment id (so one
deployment's events share a partition and keep their order), flush, and only then
mark them published. A crash after the flush and before the mark sends those events
again after the restart: consumers see each (deployment_id, rev) at least once.

Only the holder of a Redis lease (a key with a TTL that it renews) publishes; when it
dies, the lease expires and another bridge takes over. The events are those the
relay (:mod:`dm.relay`) copies from the deployments, in the order the registry
recorded them.
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaProducer

from bridge import broker
from bridge.broker import KAFKA_OUTAGES, Backoff, describe
from bridge.intake import OUTAGES
from bridge.messages import Event
from bridge.sequencer import Sequencer
from bridge.settings import BridgeSettings
from dm.control import Control
from dm.lease import Lease

log = logging.getLogger("dm.bridge")

#: events marked published between two renewals of the lease
MARK_SLICE = 500


class EventPublisher:
    def __init__(self, ctl: Control, settings: BridgeSettings, stop: threading.Event) -> None:
        self.ctl, self.s, self.stop = ctl, settings, stop
        registry = ctl.registry
        self.sequencer = Sequencer(
            settings.gap_timeout, registry.published_revs, lambda ids: registry.unpublished_events(0, ids)
        )
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
                except Exception:  # a bug: say so loudly, and go on (nothing was marked published)
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
            self.sequencer.reset()  # another holder may have published meanwhile
            log.info("events: this bridge holds the lease; publishing to %s", self.s.events_topic)
        events = self.ctl.registry.unpublished_events(self.s.publish_batch)
        if not events:
            return 0
        plan = self.sequencer.plan(events)
        futures = []
        for doc in plan.send:
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
        settled = [e["_id"] for e in plan.send + plan.skip]
        for i in range(0, len(settled), MARK_SLICE):
            self.lease.hold()  # renewed on the way: marking a big round takes a while on a slow server
            self.ctl.registry.mark_published(settled[i : i + MARK_SLICE])
        self.sequencer.confirm(plan)
        self.published += len(plan.send)
        log.debug("events: published %d, skipped %d, held %d", len(plan.send), len(plan.skip), plan.held)
        return len(plan.send) + len(plan.skip)

    def _close(self) -> None:
        if self.producer is not None:
            producer, self.producer = self.producer, None
            broker.quietly(lambda: producer.close(timeout=0))
