"""The fleet's hot state in a real Redis: the one-call placement decision agrees with the
balancer on the same figures, and the running totals of allocations stay exact."""

from __future__ import annotations

import random
import time
import uuid

import pytest
import redis

from dm import balancer, fleet
from dm import keys as k
from dm.models import Demand, MetricsSample


@pytest.fixture
def r(stack):
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()


def random_fleet(r: redis.Redis, rng: random.Random) -> None:
    r.flushdb()
    for i in range(rng.randint(1, 12)):
        node = str(rng.randint(1, 40))
        state = rng.choice(["up", "up", "up", "starting", "dead", "stopping"])
        cpus, memory = rng.choice([0.5, 1, 2, 4, 0]), rng.choice([256, 1024, 4096])
        fleet.register_node(r, node, cpus=cpus, memory=memory, state=state)
        if rng.random() < 0.8:
            sample = MetricsSample(node, cpu=rng.choice([0.0, rng.uniform(0, 100)]), ram=rng.uniform(0, 100))
            fleet.publish(r, sample, lease_ttl=60, token="t")
        for j in range(rng.randint(0, 6)):
            demand = Demand(rng.choice([0.05, 0.1, 0.25, 0.5]), rng.choice([16, 64, 128]))
            fleet.allocate(r, node, f"d{i}-{j}", demand)
        if rng.random() < 0.5:  # a later sample: some reservations have settled
            r.hset(k.NODE.format(node), "ts", str(float(r.hget(k.NODE.format(node), "ts") or 0) + 5))
            fleet.reindex(r, [node])  # as every writer of a node's figures does


@pytest.mark.parametrize("policy", ["min", "max"])
def test_the_one_call_decision_is_the_balancers_choice(r: redis.Redis, policy: str) -> None:
    rng = random.Random(7)
    placed = refused = 0
    for _ in range(300):
        random_fleet(r, rng)
        demand = Demand(rng.choice([0.05, 0.2, 0.5, 1.0]), rng.choice([16, 128, 512]))
        threshold = rng.choice([50.0, 80.0, 95.0])
        token = uuid.uuid4().hex
        answer = fleet.decide(r, token, demand, threshold, policy, settle=3.0, lock_seconds=5)
        fleet.unlock(r, token)
        chosen = balancer.choose(fleet.snapshot(r, 3.0), demand, threshold, policy)
        if chosen is None:
            assert answer == ["none"]
            refused += 1
        else:
            assert answer[:2] == ["ok", chosen.id]
            assert float(answer[2]) == pytest.approx(balancer.score(chosen))
            placed += 1
    assert placed > 50 and refused > 20  # both outcomes were exercised


@pytest.mark.parametrize("policy", ["min", "max"])
def test_many_decided_in_one_call_land_where_one_by_one_would(r: redis.Redis, policy: str) -> None:
    # Given random fleets, and a batch of demands for each
    rng = random.Random(11)
    placed = refused = 0
    for _ in range(60):
        random_fleet(r, rng)
        wants = [(f"new-{i}", Demand(rng.choice([0.05, 0.2, 0.5]), rng.choice([16, 128, 512])), 1) for i in range(8)]
        threshold = rng.choice([50.0, 80.0, 95.0])
        saved = {key: r.dump(key) for key in r.keys("*")}
        # When they are placed one by one (decide, then allocate), and again in one call
        one_by_one = []
        for dep_id, demand, generation in wants:
            answer = fleet.decide(r, "t", demand, threshold, policy, settle=3.0, lock_seconds=5)
            fleet.unlock(r, "t")
            one_by_one.append(answer[1] if answer[0] == "ok" else None)
            if answer[0] == "ok":
                fleet.allocate(r, answer[1], dep_id, demand, generation=generation)
        after_one_by_one = fleet.snapshot(r, 3.0)
        r.flushdb()
        for key, value in saved.items():
            r.restore(key, 0, value)
        batch = fleet.decide_many(r, "t", wants, threshold, policy, settle=3.0, lock_seconds=5)
        # Then the lock is held, each lands on the same node, and the fleet's figures agree
        assert batch is not None and r.get(k.PLACEMENT_LOCK) == "t"
        fleet.unlock(r, "t")
        assert [node or None for node, _ in batch] == one_by_one
        assert fleet.snapshot(r, 3.0) == after_one_by_one
        placed += sum(1 for n in one_by_one if n)
        refused += sum(1 for n in one_by_one if not n)
    assert placed > 50 and refused > 20  # both outcomes were exercised


def nodes_read(r: redis.Redis) -> int:
    """Node hashes read by scripts since the last reset (each read is one HMGET)."""
    return int(r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_a_decision_among_many_nodes_of_one_score_reads_few_of_them(r: redis.Redis) -> None:
    # Given 300 empty nodes of one kind (all of score 0), and some with a deployment that adds
    # nothing to their score (a tie on score, broken by fewer deployments, then the lower id)
    for i in range(1, 301):
        fleet.register_node(r, str(i), cpus=16, memory=65536, state="up")
    for node in ("1", "10"):
        fleet.allocate(r, node, f"free-{node}", Demand(0.0, 0.0))
    nothing = Demand(0.0, 0.0)
    fleet.decide(r, "warm", nothing, 80.0, "min", 3.0, 5)  # builds the index (reads every node once)
    fleet.unlock(r, "warm")
    # When the least-loaded node is chosen, the balancer agreeing
    r.config_resetstat()
    answer = fleet.decide(r, "t", nothing, 80.0, "min", 3.0, 5)
    fleet.unlock(r, "t")
    # Then it is the tie-break's choice, found without reading the fleet
    assert answer[:2] == ["ok", balancer.choose(fleet.snapshot(r, 3.0), nothing, 80.0, "min").id] == ["ok", "100"]
    r.config_resetstat()
    fleet.decide(r, "t", nothing, 80.0, "min", 3.0, 5)
    fleet.unlock(r, "t")
    assert nodes_read(r) <= 3
    # and a batch of 50 reads about one node per deployment, not 300
    r.config_resetstat()
    batch = fleet.decide_many(r, "t", [(f"n{i}", Demand(0.01, 1.0), 1) for i in range(50)], 80.0, "min", 3.0, 5)
    fleet.unlock(r, "t")
    assert batch is not None and len({node for node, _ in batch}) == 50  # spread, one each
    assert nodes_read(r) <= 3 * 50


def test_many_decided_wait_for_the_lock_as_one_does(r: redis.Redis) -> None:
    fleet.register_node(r, "1", cpus=1, memory=1024, state="up")
    assert fleet.decide(r, "a", Demand(0.1, 64), 80.0, "min", 3.0, 5)[0] == "ok"
    assert fleet.decide_many(r, "b", [("x", Demand(0.1, 64), 1)], 80.0, "min", 3.0, 5) is None
    assert fleet.allocations(r, "1") == {}  # nothing allocated without the lock
    fleet.unlock(r, "a")
    assert fleet.decide_many(r, "b", [("x", Demand(0.1, 64), 1)], 80.0, "min", 3.0, 5) == [("1", pytest.approx(0.0))]
    assert set(fleet.allocations(r, "1")) == {"x"}


def test_the_decision_takes_the_lock_and_waits_for_its_holder(r: redis.Redis) -> None:
    fleet.register_node(r, "1", cpus=1, memory=1024, state="up")
    assert fleet.decide(r, "a", Demand(0.1, 64), 80.0, "min", 3.0, 5)[0] == "ok"
    assert fleet.decide(r, "b", Demand(0.1, 64), 80.0, "min", 3.0, 5) == ["locked"]
    fleet.unlock(r, "b")  # not the holder: nothing happens
    assert fleet.decide(r, "b", Demand(0.1, 64), 80.0, "min", 3.0, 5) == ["locked"]
    fleet.unlock(r, "a")
    assert fleet.decide(r, "b", Demand(0.1, 64), 80.0, "min", 3.0, 5)[0] == "ok"


def test_running_totals_follow_allocations_and_releases(r: redis.Redis) -> None:
    fleet.register_node(r, "1", cpus=2, memory=2048, state="up")
    rng = random.Random(3)
    held: dict[str, Demand] = {}
    for _ in range(400):
        dep = f"d{rng.randint(0, 60)}"
        if dep in held and rng.random() < 0.5:
            fleet.release(r, "1", dep)
            del held[dep]
        else:
            held[dep] = Demand(rng.choice([0.05, 0.1, 0.3]), rng.choice([16.0, 32.0, 64.5]))
            fleet.allocate(r, "1", dep, held[dep])
    (view,) = fleet.snapshot(r, 3.0)
    assert view.deployments == len(held)
    assert view.committed_cpu == pytest.approx(sum(d.cpu for d in held.values()), abs=1e-6)
    assert view.committed_memory == pytest.approx(sum(d.memory for d in held.values()), abs=1e-6)
    assert view.reserved_cpu == pytest.approx(view.committed_cpu, abs=1e-6)  # no sample yet: all reserved
    for dep in list(held):
        fleet.release(r, "1", dep)
    (view,) = fleet.snapshot(r, 3.0)
    assert (view.deployments, view.committed_cpu, view.committed_memory, view.reserved_cpu) == (0, 0.0, 0.0, 0.0)


def test_the_dead_nodes_are_kept_in_a_set_by_every_writer_of_a_state(r: redis.Redis) -> None:
    for node in ("1", "2", "3"):
        fleet.register_node(r, node, cpus=1, memory=1024, state="up")
    fleet.set_state(r, "2", "dead")
    fleet.set_state(r, "3", "dead")
    r.hset(k.MOVED_OFF, mapping={"2": "1.0", "3": "1.0"})
    assert fleet.dead_nodes(r) == ["2", "3"]
    assert [(n, s) for n, s, _ in fleet.live_counts(r)] == [("1", "up")]
    fleet.register_node(r, "2", cpus=1, memory=1024, state="starting")  # it rejoins
    fleet.remove_node(r, "3")
    assert fleet.dead_nodes(r) == [] and r.hgetall(k.MOVED_OFF) == {}
    fleet.allocate(r, "1", "d1", Demand(0.1, 64))
    assert sorted(fleet.live_counts(r)) == [("1", "up", 1), ("2", "starting", 0)]


def test_a_lock_is_extended_only_by_its_holder(r: redis.Redis) -> None:
    r.set("dm:test:lock", "mine", px=1000)
    assert fleet.extend_lock(r, "mine", 30, key="dm:test:lock")
    assert 29_000 < r.pttl("dm:test:lock") <= 30_000
    assert not fleet.extend_lock(r, "theirs", 60, key="dm:test:lock")
    assert r.pttl("dm:test:lock") <= 30_000 and r.get("dm:test:lock") == "mine"
    r.delete("dm:test:lock")
    assert not fleet.extend_lock(r, "mine", 30, key="dm:test:lock") and r.get("dm:test:lock") is None


def test_a_sample_settles_what_was_placed_before_it_once(r: redis.Redis) -> None:
    """A node's sample taken ``settle`` after its allocations counts them in its usage: they
    leave its recent set then, so later samples do not read them again (a node that no
    placement chose since read all its settled allocations at every sample)."""
    fleet.register_node(r, "1", cpus=16, memory=65536, state="up")
    demand = Demand(0.01, 1.0)
    pipe = r.pipeline(transaction=False)
    for i in range(500):
        fleet.allocate(r, "1", f"d{i}", demand, pipe=pipe)
    pipe.execute()
    recent = k.RECENT.format("1")
    assert r.zcard(recent) == 500
    (before,) = fleet.snapshot(r, fleet.INDEX_SETTLE)
    assert before.reserved_cpu == pytest.approx(5.0)  # no sample since: all reserved

    later = MetricsSample("1", cpu=40.0, ram=10.0, ts=time.time() + fleet.INDEX_SETTLE + 1)
    fleet.publish(r, later, lease_ttl=60, token="t")
    assert r.zcard(recent) == 0  # settled: in the sample's usage now, not reserved
    (after,) = fleet.snapshot(r, fleet.INDEX_SETTLE)
    assert after.reserved_cpu == pytest.approx(0.0, abs=1e-6)
    assert (after.deployments, after.committed_cpu) == (500, pytest.approx(5.0))
    # the index scores the node on the sample (the committed share is below it)
    assert float(r.zscore(k.PLACEMENT_INDEX, r.hget(k.NODE.format("1"), "imember"))) == pytest.approx(
        balancer.load(40.0, 10.0)
    )
