"""Unit tests of the placement decision (dm.balancer): no servers needed."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from dm.balancer import (
    POLICIES,
    NodeView,
    choose,
    effective_usage,
    fits,
    load,
    score,
    with_reservation,
)
from dm.errors import ConfigError
from dm.models import Demand

SMALL = Demand(cpu=0.1, memory=64.0)


def node(
    id: str = "n1",
    state: str = "up",
    cpus: float = 1.0,
    memory: float = 1024.0,
    **usage: Any,
) -> NodeView:
    """A 1-core, 1 GiB node that is up, with the given usage fields."""
    return replace(NodeView(id, state, cpus, memory), **usage)


# -- the formula -------------------------------------------------------------------


@pytest.mark.parametrize(("cpu", "ram"), [(0.0, 0.0), (0.0, 50.0), (50.0, 0.0), (-1.0, 50.0), (50.0, -1.0)])
def test_load_is_zero_when_either_is_zero_or_less(cpu: float, ram: float) -> None:
    assert load(cpu, ram) == 0.0


@pytest.mark.parametrize("value", [1.0, 10.0, 37.5, 100.0])
def test_load_of_equal_values_is_half(value: float) -> None:
    assert load(value, value) == pytest.approx(value / 2)


@pytest.mark.parametrize(
    ("cpu", "ram", "expected"),
    [(50.0, 50.0, 25.0), (20.0, 80.0, 16.0), (80.0, 20.0, 16.0)],
)
def test_load_known_values(cpu: float, ram: float, expected: float) -> None:
    assert load(cpu, ram) == pytest.approx(expected)


def test_score_is_load_of_effective_usage() -> None:
    n = node(cpu=10.0, ram=20.0, reserved_cpu=0.1, reserved_memory=512.0)
    assert effective_usage(n) == pytest.approx((20.0, 70.0))
    assert score(n) == pytest.approx(load(20.0, 70.0))


# -- the filter ---------------------------------------------------------------------


def test_demand_counts_as_percent_of_capacity() -> None:
    # Given a 2-core, 2048 MiB node: 0.5 core and 512 MiB are 25% each
    demand = Demand(cpu=0.5, memory=512.0)
    assert fits(node(cpus=2.0, memory=2048.0, cpu=55.0, ram=55.0), demand, 80.0)
    assert not fits(node(cpus=2.0, memory=2048.0, cpu=56.0, ram=55.0), demand, 80.0)
    assert not fits(node(cpus=2.0, memory=2048.0, cpu=55.0, ram=56.0), demand, 80.0)


def test_exactly_at_threshold_fits() -> None:
    assert fits(node(cpu=70.0, ram=0.0), Demand(cpu=0.1, memory=0.0), 80.0)
    assert fits(node(), Demand(cpu=0.8, memory=819.2), 80.0)
    # 2.4 of 3 cores computes as 80.00000000000001%: not refused over a rounding error
    assert fits(node(cpus=3.0), Demand(cpu=2.4, memory=64.0), 80.0)
    assert not fits(node(), Demand(cpu=0.81, memory=64.0), 80.0)


def test_threshold_applies_to_each_resource_separately() -> None:
    assert not fits(node(cpu=79.0, ram=0.0), SMALL, 80.0)  # cpu 89%
    assert not fits(node(cpu=0.0, ram=79.0), SMALL, 80.0)  # ram 85.25%
    assert fits(node(cpu=70.0, ram=70.0), SMALL, 80.0)


def test_threshold_is_a_parameter() -> None:
    n = node(cpu=50.0)
    assert not fits(n, SMALL, 50.0)
    assert fits(n, SMALL, 60.0)


@pytest.mark.parametrize(
    ("state", "ok"),
    [("up", True), ("starting", True), ("dead", False), ("stopping", False)],
)
def test_only_up_or_starting_nodes_are_candidates(state: str, ok: bool) -> None:
    assert fits(node(state=state), SMALL, 80.0) is ok
    assert (choose([node(state=state)], SMALL) is not None) is ok


def test_node_without_capacity_never_fits() -> None:
    assert not fits(node(cpus=0.0), SMALL, 80.0)
    assert not fits(node(memory=0.0), SMALL, 80.0)


def test_committed_demand_counts_even_when_measured_usage_is_low() -> None:
    # Given deployments that declared 0.7 core but idle for now (measured 5%)
    n = node(cpu=5.0, ram=5.0, committed_cpu=0.7, committed_memory=100.0)
    assert effective_usage(n) == pytest.approx((70.0, 100.0 / 1024 * 100))
    # Then a 0.2 core deployment does not fit (90%), a 0.1 core one does (80%)
    assert not fits(n, Demand(cpu=0.2, memory=64.0), 80.0)
    assert fits(n, Demand(cpu=0.1, memory=64.0), 80.0)


def test_measured_usage_above_commitment_wins() -> None:
    n = node(cpu=60.0, ram=10.0, committed_cpu=0.2, committed_memory=512.0)
    assert effective_usage(n) == pytest.approx((60.0, 50.0))


def test_nothing_fits_returns_none() -> None:
    assert choose([], SMALL) is None
    assert choose([node(cpu=90.0), node("n2", state="dead")], SMALL) is None


# -- picking ------------------------------------------------------------------------


def test_min_picks_lowest_score() -> None:
    nodes = [
        node("a", cpu=50.0, ram=50.0),
        node("b", cpu=10.0, ram=20.0),
        node("c", cpu=30.0, ram=30.0),
    ]
    assert choose(nodes, SMALL) == nodes[1]
    assert choose(nodes, SMALL, policy="min") == nodes[1]


def test_max_picks_highest_score_that_fits() -> None:
    nodes = [
        node("a", cpu=50.0, ram=50.0),
        node("b", cpu=10.0, ram=20.0),
        node("c", cpu=79.0, ram=79.0),
    ]  # c scores highest but does not fit
    chosen = choose(nodes, SMALL, policy="max")
    assert chosen is not None and chosen.id == "a"


@pytest.mark.parametrize("policy", ["min", "max"])
def test_ties_go_to_fewer_deployments_then_id(policy: str) -> None:
    nodes = [
        node("c", cpu=20.0, ram=20.0, deployments=1),
        node("b", cpu=20.0, ram=20.0, deployments=2),
        node("a", cpu=20.0, ram=20.0, deployments=2),
    ]
    chosen = choose(nodes, SMALL, policy=policy)
    assert chosen is not None and chosen.id == "c"
    chosen = choose(nodes[1:], SMALL, policy=policy)
    assert chosen is not None and chosen.id == "a"


def test_p2c_with_one_fitting_node_takes_it() -> None:
    nodes = [node("a", cpu=90.0), node("b", cpu=30.0), node("c", state="dead")]
    for seed in range(20):
        chosen = choose(nodes, SMALL, policy="p2c", rng=random.Random(seed))
        assert chosen is not None and chosen.id == "b"


def test_p2c_picks_a_fitting_node_and_the_lower_of_its_two() -> None:
    # Given three fitting nodes a < b < c by score, and two that do not fit
    nodes = [
        node("a", cpu=10.0, ram=10.0),
        node("b", cpu=20.0, ram=20.0),
        node("c", cpu=30.0, ram=30.0),
        node("full", cpu=80.0),
        node("gone", state="dead"),
    ]
    rng = random.Random(42)
    picks = Counter(
        chosen.id for chosen in (choose(nodes, SMALL, policy="p2c", rng=rng) for _ in range(300)) if chosen is not None
    )
    # Then every pick fits; c loses every pair it is drawn in, a and b both win some
    assert sum(picks.values()) == 300
    assert set(picks) == {"a", "b"}
    assert picks["a"] > picks["b"]


def test_p2c_with_a_seed_is_repeatable_whatever_the_input_order() -> None:
    nodes = [node(f"n{i}", cpu=float(i), ram=float(i)) for i in range(1, 9)]
    first = [choose(nodes, SMALL, policy="p2c", rng=random.Random(s)) for s in range(30)]
    again = [choose(nodes[::-1], SMALL, policy="p2c", rng=random.Random(s)) for s in range(30)]
    assert first == again


def test_unknown_policy_is_a_config_error_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        choose([node()], SMALL, policy="least")
    assert "least" in str(info.value)
    assert all(policy in str(info.value) for policy in POLICIES)
    with pytest.raises(ConfigError):
        choose([], SMALL, policy="least")  # even when nothing would fit


# -- reservations -------------------------------------------------------------------


def test_with_reservation_adds_the_demand() -> None:
    n = node(reserved_cpu=0.1, committed_cpu=0.5, committed_memory=100.0, deployments=2)
    after = with_reservation(n, Demand(cpu=0.2, memory=50.0))
    assert after.reserved_cpu == pytest.approx(0.3)
    assert after.reserved_memory == pytest.approx(50.0)
    assert after.committed_cpu == pytest.approx(0.7)
    assert after.committed_memory == pytest.approx(150.0)
    assert after.deployments == 3
    assert (after.id, after.cpu, after.ram) == (n.id, n.cpu, n.ram)
    assert n.deployments == 2  # the original is untouched


def test_reservations_spread_a_burst_and_never_overcommit() -> None:
    # Given 4 empty 1-cpu nodes whose metrics will not move during the burst
    nodes = {f"n{i}": node(f"n{i}", memory=4096.0) for i in range(1, 5)}
    demand = Demand(cpu=0.3, memory=64.0)
    placed: list[str] = []
    # When 10 deploys of 0.3 cpu arrive, each reserving on the node it chose
    for _ in range(10):
        chosen = choose(nodes.values(), demand)
        if chosen is None:
            continue
        nodes[chosen.id] = with_reservation(chosen, demand)
        placed.append(chosen.id)
        # Then no node is ever above 80% effective cpu
        assert all(effective_usage(n)[0] <= 80.0 for n in nodes.values())
    # And every node got some: two each (a third 0.3 would make 90%), two left over
    assert Counter(placed) == {"n1": 2, "n2": 2, "n3": 2, "n4": 2}
    assert len(placed) == 8


def test_without_reservations_a_burst_herds_onto_one_node() -> None:
    # The counterpart of the test above: the stale snapshot always looks empty
    nodes = [node(f"n{i}", memory=4096.0) for i in range(1, 5)]
    picks = {choose(nodes, Demand(cpu=0.3, memory=64.0)) for _ in range(10)}
    assert picks == {nodes[0]}


def test_two_deployers_on_a_stale_snapshot_overcommit_but_sequential_never_does() -> None:
    # Why the caller holds a lock around decide + reserve.
    # Given two 1-cpu nodes at 20% and deploys of 0.5 core (one fits per node: 70%)
    snapshot = [node("a", cpu=20.0), node("b", cpu=20.0)]
    demand = Demand(cpu=0.5, memory=64.0)

    # When two deployers decide at once from the same snapshot
    first, second = choose(snapshot, demand), choose(snapshot, demand)
    assert first is not None and second is not None
    # Then both pick the same node, which ends up at 120% cpu
    assert first.id == second.id
    both = with_reservation(with_reservation(first, demand), demand)
    assert effective_usage(both)[0] == pytest.approx(120.0)

    # When they decide one after the other, the first reserving before the second reads
    nodes = {n.id: n for n in snapshot}
    for _ in range(3):
        chosen = choose(nodes.values(), demand)
        if chosen is not None:
            nodes[chosen.id] = with_reservation(chosen, demand)
    # Then each node takes one, the third deploy finds no room, nothing passes 80%
    assert {n.id: n.deployments for n in nodes.values()} == {"a": 1, "b": 1}
    assert all(effective_usage(n)[0] <= 80.0 for n in nodes.values())
