"""The consume loop: poll a batch of requests, handle it, and only then commit its offsets.

Order per batch (at-least-once, and the request id makes redelivery harmless): record
the deployments (their ``pending`` events sent first when this bridge holds the events
lease) -> enqueue ``deploy`` -> dead letters flushed to the DLQ -> commit. An outage of
MongoDB or Redis (:func:`dm.outage.is_outage`) holds the batch (retried with backoff,
nothing committed); a permanent error of a request's write dead-letters that request
(:mod:`bridge.intake`), so it never holds the batch. An outage of Kafka ends the
session: the clients are closed and made again once the broker answers, so
partitions, positions and topics come from a fresh start.

Throughput: a batch is recorded, enqueued and dead-lettered in a helper thread (mostly
waiting on MongoDB) while the next batch is polled and screened; a batch is committed
once its own work is done, so commits stay in order and come after their work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka import errors as kafka_errors

from bridge import broker
from bridge.broker import KAFKA_OUTAGES, Backoff, describe
from bridge.intake import Intake, Outcome
from bridge.publisher import EventPublisher
from bridge.settings import BridgeSettings
from dm.outage import is_outage

log = logging.getLogger("dm.bridge")
T = TypeVar("T")

#: a commit refused because the group moved the partitions meanwhile (not an outage)
REBALANCED = (
    kafka_errors.CommitFailedError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
)
#: seconds between the log lines that count what was committed
STATS_EVERY = 10.0
#: a record the broker refused as too large (its limit is below the producer's)
TOO_LARGE = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)
#: what dead letters are cut to when the broker refused one as too large
DLQ_FALLBACK_BYTES = 64 * 1024


class BrokerGone(OSError):
    """The broker stopped answering while the consumer was idle."""


class Stopped(Exception):
    """Asked to stop while waiting out an outage: leave the batch uncommitted."""


@dataclass
class InFlight:
    """A recorded batch whose enqueue and dead letters are under way."""

    offsets: dict[TopicPartition, OffsetAndMetadata]
    outcome: Outcome
    done: Future[None]


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("requests: partitions revoked: %s", _names(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("requests: partitions assigned: %s", _names(assigned) or "none")


def _names(partitions: Any) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))


class RequestConsumer:
    def __init__(
        self, settings: BridgeSettings, intake: Intake, stop: threading.Event, publisher: EventPublisher | None = None
    ) -> None:
        self.s, self.intake, self.stop, self.publisher = settings, intake, stop, publisher
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bridge-enqueue")
        #: requests committed (recorded and enqueued), since the start
        self.accepted = 0
        #: new, known, dead-lettered since window_start, for a periodic log line
        self.window, self.window_start = [0, 0, 0], time.monotonic()

    def run(self) -> None:
        """Consume until ``stop`` is set, through broker outages."""
        backoff = Backoff(self.s.backoff_first, self.s.backoff_max)
        try:
            while broker.connect(self.s, self.stop, "requests"):
                try:
                    self._session()
                    return
                except KAFKA_OUTAGES as exc:
                    if self.stop.is_set():
                        return
                    delay = backoff.next()
                    why = describe(exc)
                    log.warning("requests: lost Kafka at %s (%s); reconnecting in %.1fs", self.s.bootstrap, why, delay)
                    self.stop.wait(delay)
                except Stopped:
                    return
                except Exception:  # a bug: say so loudly, and start over (nothing was committed)
                    delay = backoff.next()
                    log.exception("requests: unexpected error; the batch stays uncommitted, restarting in %.1fs", delay)
                    self.stop.wait(delay)
        finally:
            self.pool.shutdown(wait=True)

    def _session(self) -> None:
        consumer = broker.consumer(self.s, Rebalance())
        producer = broker.producer(self.s)
        log.info("requests: consuming %s as group %s", self.s.requests_topic, self.s.group)
        inflight: InFlight | None = None
        idle_since = time.monotonic()
        try:
            while not self.stop.is_set():
                polled = consumer.poll(timeout_ms=int(self.s.poll_seconds * 1000))
                records = [r for tp in sorted(polled) for r in polled[tp]]
                if not records and inflight is None:
                    if time.monotonic() - idle_since > self.s.probe_seconds:
                        if not broker.reachable(self.s):
                            raise BrokerGone("it refuses connections")
                        idle_since = time.monotonic()
                    continue
                idle_since = time.monotonic()
                outcome = self._retry(self.intake.screen, records) if records else None
                if inflight is not None:
                    self._finish(consumer, producer, inflight)
                    inflight = None
                if outcome is not None:
                    offsets = {TopicPartition(r.topic, r.partition): r.offset for r in records}
                    commit = {tp: OffsetAndMetadata(o + 1, "", -1) for tp, o in offsets.items()}
                    inflight = InFlight(commit, outcome, self.pool.submit(self._deliver, producer, outcome))
            if inflight is not None:
                self._finish(consumer, producer, inflight)
        finally:
            broker.quietly(lambda: consumer.close(autocommit=False, timeout_ms=int(self.s.kafka_timeout * 1000)))
            broker.quietly(lambda: producer.close(timeout=self.s.kafka_timeout))

    def _deliver(self, producer: KafkaProducer, outcome: Outcome) -> None:
        """Record and enqueue the deployments, and flush the dead letters (in the helper thread)."""
        self.intake.record(outcome)
        self.intake.enqueue(outcome)
        # cut to what the producer sends: a record it refuses would hold the partition up for good
        letters = [d.fitted(self.s.max_request_size) for d in outcome.dead]
        try:
            self._send(producer, [(self.s.dlq_topic, d.key, d.value, d.headers()) for d in letters])
        except TOO_LARGE as exc:  # the broker takes less than the producer (message.max.bytes): cut more
            log.warning(
                "requests: the broker refused a dead letter as too large (%s); sending the batch's dead letters "
                "again cut to %d bytes (set DM_BRIDGE_MAX_REQUEST_SIZE to the broker's limit)",
                describe(exc), DLQ_FALLBACK_BYTES,
            )  # fmt: skip
            letters = [d.fitted(min(DLQ_FALLBACK_BYTES, self.s.max_request_size)) for d in outcome.dead]
            self._send(producer, [(self.s.dlq_topic, d.key, d.value, d.headers()) for d in letters])
        for dead in letters:
            cut = f" (value cut from {dead.size} bytes)" if dead.truncated else ""
            log.info("requests: %s[%d]@%d to the DLQ%s: %s", dead.topic, dead.partition, dead.offset, cut, dead.reason)

    def _send(self, producer: KafkaProducer, records: list[tuple[str, bytes | None, bytes | None, Any]]) -> None:
        """Send records and wait until every one is acknowledged (raises if one failed)."""
        futures = [producer.send(topic, key=k, value=v, headers=h) for topic, k, v, h in records]
        if futures:
            producer.flush(timeout=self.s.kafka_timeout)
            for future in futures:
                future.get(timeout=self.s.kafka_timeout)

    def _finish(self, consumer: KafkaConsumer, producer: KafkaProducer, inflight: InFlight) -> None:
        """Wait for a batch's delivery (done again here after an outage), then commit it."""
        try:
            inflight.done.result()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._retry(self._deliver, producer, inflight.outcome)
        self._commit(consumer, inflight)

    def _commit(self, consumer: KafkaConsumer, inflight: InFlight) -> None:
        try:
            consumer.commit(inflight.offsets, timeout_ms=int(self.s.kafka_timeout * 1000))
        except REBALANCED as exc:  # the partitions moved on: their new owner reads these again
            log.info("requests: commit refused (%s); those requests will be read again, harmlessly", describe(exc))
            return
        out = inflight.outcome
        self.accepted += out.created + out.known
        self.window = [a + b for a, b in zip(self.window, (out.created, out.known, len(out.dead)), strict=True)]
        log.debug("requests: committed %d new, %d known, %d to the DLQ", out.created, out.known, len(out.dead))
        if time.monotonic() - self.window_start >= STATS_EVERY:
            created, known, dead = self.window
            log.info(
                "requests: %d new, %d already recorded, %d to the DLQ in the last %.0fs",
                created, known, dead, time.monotonic() - self.window_start,
            )  # fmt: skip
            self.window, self.window_start = [0, 0, 0], time.monotonic()

    def _retry(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` again and again through outages of MongoDB or Redis; Stopped if asked to stop."""
        backoff = Backoff(self.s.backoff_first, self.s.backoff_max)
        while True:
            try:
                result = work(*args)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                delay = backoff.next()
                log.warning(
                    "requests: MongoDB or Redis is unavailable (%s); retrying the batch in %.1fs (uncommitted)",
                    describe(exc), delay,
                )  # fmt: skip
                if self.stop.wait(delay):
                    raise Stopped from exc
                continue
            if backoff.failures:
                log.info("requests: MongoDB and Redis answer again")
            return result
