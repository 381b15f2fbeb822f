"""Kafka bridge throughput: requests accepted per second (consumed, recorded, enqueued, committed).

Starts a private embedded stack (Redis, SecantusDB, Tansu) in a temp dir, adds the
``hello`` example, writes ``--count`` requests to a fresh requests topic, starts
``python -m bridge`` (no control worker: the ``dm.deploy`` tasks stay queued in Redis)
and times from the moment it has its partitions until the group's committed offsets
cover every request. Twice: with event publishing off (the request path alone), then
on (the full bridge; its events rate is reported too), and once more with publishing off
on a stream where 1% of the requests are poison (one of each kind MongoDB cannot store,
and an unknown field, in turn): its accepted rate (good requests recorded and
committed per second) against the clean stream's. Baselines from the same run:
kafka-python's raw consume-and-commit rate on the same broker and topic layout, and
the registry's raw bulk-insert rate (``insert_many`` in batches of the bridge's size, of
bare documents, and of the deployment documents recording writes, each carrying its
``pending`` event). With publishing on, a relay (:mod:`dm.relay`, as every control worker
runs one) copies the events for the publisher, on the same registry.
Goal: at least 2,000 requests/s, or, if the registry's bulk rate is lower, half of it;
with 1% poison, at least 0.8x the clean stream's accepted rate.

    /work/venv/bin/python bench/bridge.py [--count 10000] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DOC, ROOT, table, verdict, wait_for, write_section

GOAL_RATE = 2000.0
BATCH = 500
#: one request in this many is poison in the poison stream
POISON_EVERY = 100
#: the accepted rate with poison, as a share of the clean stream's
GOAL_POISON = 0.8
#: poison requests, in turn (each one dead-lettered; see docs/kafka.md)
POISON: list[str] = [
    '{"request_id": "%s", "algorithm": "hello", "args": {"n": 18446744073709551616}}',
    '{"request_id": "%s", "algorithm": "hello", "args": {"a\\u0000b": 1}}',
    '{"request_id": "%s", "algorithm": "hello", "args": {"who": "\\ud800"}}',
    '{"request_id": "%s", "algorithm": "hello", "args": ' + '{"a": ' * 98 + "{}" + "}" * 98 + "}",
    '{"request_id": "%s", "algorithm": "hello", "args": {"$where": "1"}}',
    '{"request_id": "%s", "algorithm": "hello", "args": {"a.b": 1}}',
    '{"request_id": "%s", "algorithm": "hello", "arg": {"n": 1}}',
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10_000, help="requests per run (default 10000)")
    p.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    args = p.parse_args(argv)
    from dm.embedded import EmbeddedStack, stop_pid

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dm-bench-bridge-"))
    try:
        with EmbeddedStack(work / "stack", kafka=True) as stack:
            env = {**os.environ, **stack.env(), "DM_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
            figures: dict[str, Any] = {"kafka": kafka_baseline(stack.kafka_bootstrap or "", args.count)}
            # the registry's rates before and after the bridge runs (the machine drifts), averaged
            bulk = [bulk_baseline(stack.mongo_url, args.count)]
            # clean, poison, publishing on, poison, clean: the two kinds compared are symmetric
            # about the middle, so a machine that drifts over the run favours neither
            runs: dict[str, list[dict[str, float]]] = {"clean": [], "poison": [], "events": []}
            for kind in ("clean", "poison", "events", "poison", "clean"):
                runs[kind].append(bridge_run(env, work, args.count, kind == "events", stop_pid, kind == "poison"))
            figures["bridge_events_True"] = runs["events"][0]
            for kind, key in (("clean", "bridge_events_False"), ("poison", "bridge_poison")):
                figures[key] = {k: sum(r[k] for r in runs[kind]) / len(runs[kind]) for k in runs[kind][0]}
                figures[key]["each"] = [r["rate"] for r in runs[kind]]  # type: ignore[assignment]
            bulk.append(bulk_baseline(stack.mongo_url, args.count))
            figures["bulk"] = {k: (bulk[0][k] + bulk[1][k]) / 2 for k in bulk[0]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, figures, time.monotonic() - started)
    return 0


def fresh(env: dict[str, str]) -> tuple[dict[str, str], Any]:
    """An env with its own database and topics, and a Control on it with ``hello`` added."""
    from dm.control import Control
    from dm.package import load_spec, pack
    from dm.settings import Settings

    tag = uuid.uuid4().hex[:8]
    env = {**env, "DM_DATABASE": f"bench_bridge_{tag}", "DM_BRIDGE_GROUP": f"bench-{tag}"}
    env |= {f"DM_BRIDGE_{k}_TOPIC": f"bench.{k.lower()}.{tag}" for k in ("REQUESTS", "DLQ", "EVENTS")}
    ctl = Control(Settings.from_env(env))
    ctl.registry.ensure_indexes()
    hello = ROOT / "examples" / "algorithms" / "hello"
    ctl.registry.add_algorithm(load_spec(hello), *pack(hello))
    return env, ctl


def produce(bootstrap: str, topic: str, count: int, partitions: int = 4, poison: bool = False) -> int:
    """``count`` requests on a new topic, every :data:`POISON_EVERY`-th one poison if asked; returns how many are."""
    from kafka import KafkaAdminClient, KafkaProducer

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": -1}})
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024)
    bad = 0
    for i in range(count):
        request_id = f"req-{i}"
        if poison and i % POISON_EVERY == POISON_EVERY // 2:
            value = (POISON[bad % len(POISON)] % request_id).encode()
            bad += 1
        else:
            value = json.dumps(
                {"request_id": request_id, "algorithm": "hello", "args": {"who": "bench", "n": i}}
            ).encode()
        producer.send(topic, key=request_id.encode(), value=value)
    producer.flush()
    producer.close()
    return bad


def kafka_baseline(bootstrap: str, count: int) -> float:
    """kafka-python alone: poll batches, decode each JSON value, commit each batch."""
    from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    produce(bootstrap, topic, count)
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{topic}", enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             max_poll_records=BATCH)  # fmt: skip
    seen, t0 = 0, 0.0
    while seen < count:
        polled = consumer.poll(timeout_ms=500)
        if polled and not t0:
            t0 = time.perf_counter()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, records in polled.items():
            for record in records:
                json.loads(record.value)
            seen += len(records)
            offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
        if offsets:
            consumer.commit(offsets)
    rate = count / (time.perf_counter() - t0)
    consumer.close()
    return rate


def bulk_baseline(mongo_url: str, count: int) -> dict[str, float]:
    """The registry's ``insert_many`` rate, in batches of the bridge's size, of three kinds of document."""
    from dm.models import DeployRequest
    from dm.registry import Registry

    algorithm = {"name": "hello", "version": "1", "sha256": "0" * 64, "spec": {
        "command": ["python", "main.py"], "env": {}, "demand": {"cpu": 0.05, "memory": 32.0},
        "restart": {"policy": "never", "max_restarts": 5, "backoff": 0.5, "backoff_max": 30.0}}}  # fmt: skip
    out = {}
    for kind in ("bare", "deployments"):
        registry = Registry(mongo_url, f"bench_bulk_{uuid.uuid4().hex[:8]}")
        registry.ensure_indexes()
        bare = registry.db["bare"]
        if kind == "bare":
            bare.create_index("request_id", unique=True)
        t0 = time.perf_counter()
        for start in range(0, count, BATCH):
            requests = [DeployRequest("hello", {"n": i}, f"req-{i}") for i in range(start, min(count, start + BATCH))]
            if kind == "bare":
                bare.insert_many([{"_id": r.request_id, "request_id": r.request_id} for r in requests], ordered=False)
                continue
            registry.deployments.insert_many([registry.new_deployment(r, algorithm) for r in requests], ordered=False)
        out[kind] = count / (time.perf_counter() - t0)
        registry.db.client.drop_database(registry.db.name)
    return out


def bridge_run(
    env: dict[str, str], work: Path, count: int, events: bool, stop_pid: Any, poison: bool = False
) -> dict[str, float]:
    from kafka import KafkaAdminClient

    env, ctl = fresh(env)
    env["DM_BRIDGE_PUBLISH_EVENTS"] = str(events).lower()
    env["DM_BRIDGE_SESSION_TIMEOUT_MS"] = "6000"
    topic, group = env["DM_BRIDGE_REQUESTS_TOPIC"], env["DM_BRIDGE_GROUP"]
    bad = produce(env["DM_KAFKA_BOOTSTRAP"], topic, count, poison=poison)
    good = count - bad
    log = work / f"bridge-{group}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bridge"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    admin = KafkaAdminClient(bootstrap_servers=env["DM_KAFKA_BOOTSTRAP"])
    relay = None
    if events:  # what a control worker runs: the events the publisher sends are the relay's copies
        from dm.relay import Relay

        relay = Relay(ctl)
        relay.start()
    try:
        wait_for(lambda: "partitions assigned: bench" in log.read_text(), 60, "the bridge's partitions", 0.005)
        t0 = time.perf_counter()
        wait_for(lambda: committed(admin, group) >= count, 600, f"{count} committed requests", 0.02)
        seconds = time.perf_counter() - t0
        recorded = ctl.registry.deployments.count_documents({})
        queued = ctl.redis.llen("dm.control")
        if recorded != good or queued < good:
            raise RuntimeError(f"{recorded} deployments recorded and {queued} tasks queued for {good} good requests")
        # accepted: the good requests, recorded and committed; the poison ones are not counted
        result = {"rate": good / seconds, "poison": float(bad)}
        if bad:
            letters = dead_letters(env["DM_KAFKA_BOOTSTRAP"], env["DM_BRIDGE_DLQ_TOPIC"], bad)
            if letters != bad:
                raise RuntimeError(f"{letters} dead letters for {bad} poison requests")
        if events:
            from bridge.publisher import EventPublisher
            from bridge.settings import BridgeSettings

            position = EventPublisher(ctl, BridgeSettings.from_env(env), relay.stop if relay else None).position

            def published() -> bool:  # every pending event numbered, and the publisher past them all
                mark = ctl.registry.events_mark()
                numbered = ctl.registry.events.count_documents({"_id": {"$gte": 0, "$lte": mark}})
                return numbered >= count and position() >= mark

            wait_for(published, 600, "events published")
            result["events_rate"] = count / (time.perf_counter() - t0)
    finally:
        stop_pid(proc.pid, 15)
        if relay is not None:
            relay.stop.set()
            relay.join(10)
        admin.close()
        ctl.registry.db.client.drop_database(ctl.settings.database)
    if re.search(r"Traceback|ERROR", log.read_text()):
        raise RuntimeError(f"the bridge logged errors:\n{log.read_text()[-3000:]}")
    return result


def dead_letters(bootstrap: str, topic: str, expected: int) -> int:
    """How many records the DLQ holds (read from the start until ``expected``, or 10 s without more)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    seen, quiet_since = 0, time.monotonic()
    try:
        consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [0])])
        consumer.seek_to_beginning()
        while seen < expected and time.monotonic() - quiet_since < 10:
            batch = sum(len(rs) for rs in consumer.poll(timeout_ms=200).values())
            seen += batch
            quiet_since = time.monotonic() if batch else quiet_since
    finally:
        consumer.close()
    return seen


def committed(admin: Any, group: str) -> int:
    offsets = admin.list_group_offsets(group).get(group) or {}
    return sum(meta.offset for meta in offsets.values() if meta.offset > 0)


def spread(rates: list[float], what: str) -> str:
    """A sentence on how far apart the same run's repeats were, when that is more than the usual noise."""
    low, high = min(rates), max(rates)
    if high <= 1.25 * low:
        return ""
    return (
        f"The two {what} runs were {high / low:.1f}x apart: the machine's load (others' work on its two cores) "
        "moved during the run, so the absolute rates say as much about the machine as about the bridge; the "
        "same-run ratio is the comparison."
    )


def report(args: argparse.Namespace, f: dict[str, Any], seconds: float) -> None:
    bulk = f["bulk"]
    goal = GOAL_RATE if bulk["bare"] >= GOAL_RATE else bulk["bare"] / 2
    intake, full = f["bridge_events_False"]["rate"], f["bridge_events_True"]["rate"]
    poisoned, bad = f["bridge_poison"]["rate"], int(f["bridge_poison"]["poison"])
    ratio = poisoned / intake
    rows = [
        ["baseline: kafka-python poll + JSON decode + commit", f"{f['kafka']:,.0f}", ""],
        ["baseline: registry `insert_many`, bare `{_id, request_id}` documents, one index", f"{bulk['bare']:,.0f}",
         "1.00"],
        ["baseline: registry `insert_many` of deployments as recorded (their collection, its indexes, each with "
         "its `pending` event)", f"{bulk['deployments']:,.0f}", f"{bulk['deployments'] / bulk['bare']:.2f}"],
        ["**bridge, event publishing off: requests accepted** (mean of two runs: "
         f"{', '.join(f'{r:,.0f}' for r in f['bridge_events_False']['each'])})", f"**{intake:,.0f}**",
         f"{intake / bulk['bare']:.2f}"],
        ["bridge, event publishing on (and the relay running): requests accepted", f"{full:,.0f}",
         f"{full / bulk['bare']:.2f}"],
        ["bridge, event publishing on: `pending` events published (from the same start)",
         f"{f['bridge_events_True']['events_rate']:,.0f}", ""],
        [f"**bridge, event publishing off, 1% poison ({bad} of {args.count:,} dead-lettered): good requests "
         f"accepted** (mean of two runs: {', '.join(f'{r:,.0f}' for r in f['bridge_poison']['each'])})",
         f"**{poisoned:,.0f}**", f"{poisoned / bulk['bare']:.2f}"],
    ]  # fmt: skip
    which = "2,000/s" if goal == GOAL_RATE else f"half the registry's bare bulk rate ({goal:,.0f}/s)"
    body = (
        f"{args.count:,} requests per run (`hello`, ~90 bytes each) on a 4-partition topic, in batches of {BATCH}; "
        "no control worker, so the `dm.deploy` tasks stay queued. A request counts once its offset is committed, "
        "after its deployment (carrying its `pending` event) is in MongoDB and its task is in Redis. With event "
        "publishing on, a relay copies the events as a control worker's would. The registry baselines are the "
        "mean of a run before and one after the bridge's; the bridge's runs go clean, 1% poison, publishing on, "
        f"1% poison, clean, so a machine that drifts over the run favours neither. Run time {seconds:.0f} s.\n\n"
        + table(["path", "per second", "÷ bare bulk insert"], rows)
        + f"\n\nGoal: 2,000/s, or half the registry's bulk rate when that is lower; here {which}: "
        f"event publishing off **{verdict(intake >= goal)}**, on **{verdict(full >= goal)}**. "
        f"With 1% poison (each kind MongoDB cannot store, and an unknown field, in turn) the good requests are "
        f"accepted at {ratio:.2f}x the clean stream's rate (goal {GOAL_POISON}x): **{verdict(ratio >= GOAL_POISON)}**; "
        "the poison is refused by the check before the write, so no write is split. "
        f"{spread(f['bridge_events_False']['each'], 'clean')}\n\n"
        "Where the time goes: the bridge waits on MongoDB (SecantusDB here): one `insert_many` of the batch's "
        "deployments, each document carrying its `pending` event (a transactional outbox: no second write per "
        f"request). Kafka ({f['kafka']:,.0f}/s) and the one `LPUSH` per batch are small beside it, and a batch "
        "is checked while the one before is written. With publishing on, the relay (copying each event into "
        "`events`) and the publisher (marking what it sent) write to the same server, which the two cores "
        "share. Figures vary by about 15% from run to run on this machine."
    )
    print(body)
    if not args.no_doc:
        title = "Kafka bridge: requests accepted per second (baseline: kafka-python poll and registry `insert_many`)"
        print("wrote", write_section("bridge", title, body))


if __name__ == "__main__":
    raise SystemExit(main())
