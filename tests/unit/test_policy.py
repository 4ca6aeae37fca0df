from __future__ import annotations

import collections

import pytest

from state.policy import Choice, NodeLoad, choose_node, cost, rendezvous_rank, tie_key
from state.types import Candidate, CostWeights, RouteRequest, Strategy

A, B, C = Candidate("a", max_concurrency=4, cache_slots=10), Candidate("b"), Candidate("c")
BLOCKS = tuple(f"{i:016x}" for i in range(10))


def request(strategy: Strategy = Strategy.CACHE_AWARE, *, session: str | None = "s", **kw: object) -> RouteRequest:
    fields: dict[str, object] = {"pool": "p", "candidates": (A, B, C), "blocks": BLOCKS, "lease_id": "lease"}
    fields.update(kw)
    return RouteRequest(strategy=strategy, session=session, **fields)  # type: ignore[arg-type]


def L(inflight: int = 0, sessions: int = 0, matched: int = 0) -> NodeLoad:
    return NodeLoad(inflight, sessions, matched)


# -- cache-aware: the session binding ------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "binding", "candidates", "node", "reason"),
    [
        # honoured, even when another node holds a little more of the prompt or is idler
        ({"b": L(matched=3), "a": L(matched=2, inflight=3)}, "a", (A, B, C), "a", "session"),
        # the bound node evicted the conversation and another holds a quarter of the prompt more: move there
        ({"b": L(matched=10), "a": L(matched=2, inflight=3)}, "a", (A, B, C), "b", "rebind-evicted"),
        # ...unless that node is overloaded
        ({"b": L(matched=10, inflight=8), "a": L(matched=2)}, "a", (A, B, C), "a", "session"),
        # in-flight just under max_concurrency * overload_factor (4 * 2) still sticks
        ({"a": L(inflight=7)}, "a", (A, B, C), "a", "session"),
        # at 8 it moves, to the best other node
        ({"a": L(inflight=8), "c": L(matched=3)}, "a", (A, B, C), "c", "rebind-overloaded"),
        # every candidate that loaded: moving would only lose the cache
        ({"a": L(inflight=8), "b": L(inflight=8), "c": L(inflight=8)}, "a", (A, B, C), "a", "session"),
        # the bound node is no longer routable (unhealthy, draining, removed, excluded on retry)
        ({"c": L(matched=2)}, "a", (B, C), "c", "rebind-unavailable"),
    ],
)
def test_session_binding(
    loads: dict[str, NodeLoad], binding: str, candidates: tuple[Candidate, ...], node: str, reason: str
) -> None:
    choice = choose_node(request(candidates=candidates), loads, binding)
    assert (choice.node_id, choice.reason, choice.bind) == (node, reason, True)


def test_no_session_means_no_binding_read_or_written() -> None:
    choice = choose_node(request(session=None), {"b": L(matched=4)}, "a")
    assert choice == Choice("b", "prefix", 4, bind=False)


@pytest.mark.parametrize("strategy", [s for s in Strategy if s is not Strategy.CACHE_AWARE])
def test_only_cache_aware_binds(strategy: Strategy) -> None:
    choice = choose_node(request(strategy, latency_order=("c",), random_pick=0.5), {}, "a")
    assert not choice.bind
    assert not choice.reason.startswith(("session", "rebind"))


# -- cache-aware: the cost -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "total", "weights", "expected"),
    [
        (L(), 10, CostWeights(), 10.0),
        (L(matched=10), 10, CostWeights(), 0.0),
        (L(matched=6), 10, CostWeights(), 4.0),
        (L(inflight=2), 10, CostWeights(), 15.0),  # half loaded: + half a prompt
        (L(inflight=2), 10, CostWeights(load=0.5), 12.5),
        (L(sessions=9), 10, CostWeights(spread=0), 10.0),  # the 10th session still fits in 10 slots
        (L(sessions=10), 10, CostWeights(spread=0), 20.0),  # the 11th evicts someone: + one prompt
        (L(sessions=12), 10, CostWeights(crowding=0.5, spread=0), 25.0),
        (L(matched=4, inflight=4, sessions=10), 8, CostWeights(spread=0), 4 + 8 * 2.0),
        (L(matched=10, sessions=3), 10, CostWeights(spread=2.5), 7.5),  # each bound session: + spread blocks
        (L(matched=4, inflight=4, sessions=10), 8, CostWeights(spread=1.0), 4 + 8 * 2.0 + 10),
        (L(), 0, CostWeights(), 0.0),
    ],
)
def test_cost(load: NodeLoad, total: int, weights: CostWeights, expected: float) -> None:
    assert cost(A, load, total, weights) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("loads", "node", "reason"),
    [
        # the longest cached prefix wins
        ({"a": L(matched=3), "b": L(matched=9), "c": L(matched=5)}, "b", "prefix"),
        # ... unless it is busy: 9 matched but 3/4 loaded (cost 1 + 7.5) loses to 5 matched idle (cost 5)
        ({"a": L(matched=3), "b": L(matched=9, inflight=3), "c": L(matched=5)}, "c", "prefix"),
        # ... or crowded: the 11th session on b costs a whole prompt more
        ({"b": L(matched=9, sessions=10), "c": L(matched=5)}, "c", "prefix"),
        # an overloaded node is skipped even with the whole prompt cached
        ({"b": L(matched=10, inflight=8), "c": L(inflight=1)}, "a", "cold"),
        # ... unless every node is overloaded: then cost decides among them
        ({"a": L(inflight=8), "b": L(matched=10, inflight=9), "c": L(inflight=8)}, "b", "prefix"),
        # nothing cached anywhere: the idlest node
        ({"a": L(inflight=1), "b": L(inflight=2), "c": L()}, "c", "cold"),
    ],
)
def test_cache_aware_cost_decides(loads: dict[str, NodeLoad], node: str, reason: str) -> None:
    choice = choose_node(request(), loads, None)
    assert (choice.node_id, choice.reason, choice.bind) == (node, reason, True)
    assert choice.matched_blocks == loads.get(node, L()).matched_blocks


def place_sessions(count: int, slots: int, weights: CostWeights) -> tuple[list[str], dict[str, int]]:
    """New sessions whose 81-block first prompts share 80 blocks of tools and system prompt, one after
    another; the node that served one holds the shared blocks from then on."""
    candidates = tuple(Candidate(n, cache_slots=slots) for n in "abc")
    blocks = (*tuple(f"shared{i}" for i in range(80)), "own")
    sessions = {"a": 0, "b": 0, "c": 0}
    holds_tools = {"a"}
    placed = []
    for i in range(count):
        loads = {n: L(sessions=sessions[n], matched=80 if n in holds_tools else 0) for n in sessions}
        req = request(candidates=candidates, session=f"s{i}", blocks=blocks, weights=weights)
        choice = choose_node(req, loads, None)
        sessions[choice.node_id] += 1
        holds_tools.add(choice.node_id)
        placed.append(choice.node_id)
    return placed, sessions


def test_shared_prefix_fills_a_node_to_its_cache_slots_then_spreads() -> None:
    placed, sessions = place_sessions(9, 3, CostWeights(spread=0))
    assert placed[:3] == ["a", "a", "a"]
    assert sessions == {"a": 3, "b": 3, "c": 3}


def test_spread_warms_another_node_before_one_node_takes_every_session() -> None:
    """With spread 32 blocks per session, the node holding the 80 shared blocks takes three sessions
    (cost 1, 33, 65 < 81 for a cold start), then a cold node starts; sessions stay within ~3 of each other."""
    placed, sessions = place_sessions(9, 10, CostWeights())
    assert placed[:3] == ["a", "a", "a"]
    assert placed[3] != "a"
    assert sessions == {"a": 3, "b": 3, "c": 3}
    _, many = place_sessions(30, 10, CostWeights())
    assert max(many.values()) - min(many.values()) <= 3, many


def test_the_overflow_of_a_full_cluster_is_spread_evenly() -> None:
    """12 sessions for 3 nodes holding 3 conversations each: 4/4/4. On real nodes with sessions taking turns
    at their own pace (bench/real_routing.py --stagger 1.5), 4/4/4 lost 5 of 60 later turns to eviction;
    3/3/6 lost 14 of the overflow node's 30: piling the overflow on one node costs more than it saves."""
    _, sessions = place_sessions(12, 3, CostWeights())
    assert sorted(sessions.values()) == [4, 4, 4], sessions


def test_equal_nodes_spread_sessions_by_rendezvous_hash() -> None:
    counts = collections.Counter(choose_node(request(session=f"s{i}"), {}, None).node_id for i in range(600))
    assert set(counts) == {"a", "b", "c"}
    assert all(140 < n < 260 for n in counts.values()), counts


def test_ties_go_to_the_node_with_fewer_sessions_first() -> None:
    loads = {"a": L(sessions=2), "b": L(sessions=1), "c": L(sessions=2)}
    assert {choose_node(request(session=f"s{i}"), loads, None).node_id for i in range(50)} == {"b"}


def test_same_inputs_same_choice() -> None:
    loads = {"a": L(matched=2), "b": L(matched=2)}
    assert len({choose_node(request(session="x"), loads, None) for _ in range(20)}) == 1


@pytest.mark.parametrize(
    ("session", "blocks", "lease", "key"),
    [("s1", BLOCKS, "l", "s1"), (None, BLOCKS, "l", BLOCKS[0]), (None, (), "l", "l"), ("", (), "l", "l")],
)
def test_tie_key(session: str | None, blocks: tuple[str, ...], lease: str, key: str) -> None:
    assert tie_key(request(session=session, blocks=blocks, lease_id=lease)) == key


def test_rendezvous_rank_is_stable_and_48_bit() -> None:
    assert rendezvous_rank("s", "a") == rendezvous_rank("s", "a")
    assert rendezvous_rank("s", "a") != rendezvous_rank("s", "b")
    assert 0 <= rendezvous_rank("s", "a") < 2**48


# -- the baselines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("turn", "node"), [(0, "a"), (1, "b"), (2, "c"), (3, "a"), (100, "b")])
def test_round_robin(turn: int, node: str) -> None:
    choice = choose_node(request(Strategy.ROUND_ROBIN), {"a": L(inflight=100)}, None, turn=turn)
    assert (choice.node_id, choice.reason) == (node, "round-robin")


@pytest.mark.parametrize(
    ("loads", "candidates", "node"),
    [
        ({"a": L(inflight=2), "b": L(inflight=1), "c": L(inflight=3)}, (A, B, C), "b"),
        # relative to max_concurrency: 3 of 8 beats 2 of 4
        ({"a": L(inflight=2), "b": L(inflight=3)}, (A, Candidate("b", max_concurrency=8)), "b"),
        # equal load: fewer bound sessions
        (
            {"a": L(inflight=1, sessions=3), "b": L(inflight=1, sessions=1), "c": L(inflight=1, sessions=2)},
            (A, B, C),
            "b",
        ),
    ],
)
def test_least_loaded(loads: dict[str, NodeLoad], candidates: tuple[Candidate, ...], node: str) -> None:
    choice = choose_node(request(Strategy.LEAST_LOADED, candidates=candidates), loads, None)
    assert (choice.node_id, choice.reason) == (node, "least-loaded")


def test_least_loaded_spreads_ties_by_hash() -> None:
    nodes = {choose_node(request(Strategy.LEAST_LOADED, session=f"s{i}"), {}, None).node_id for i in range(60)}
    assert nodes == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("order", "loads", "node"),
    [
        (("c", "a", "b"), {}, "c"),
        (("c", "a", "b"), {"c": L(inflight=8)}, "a"),  # overloaded: skipped
        (("x", "b"), {}, "b"),  # ids that are not candidates are ignored
        (("b",), {"b": L(inflight=8)}, "a"),  # unranked candidates follow, in configured order
        ((), {}, "a"),
        (("c", "a", "b"), {"a": L(inflight=8), "b": L(inflight=8), "c": L(inflight=8)}, "c"),  # all overloaded
    ],
)
def test_latency_based(order: tuple[str, ...], loads: dict[str, NodeLoad], node: str) -> None:
    choice = choose_node(request(Strategy.LATENCY_BASED, latency_order=order), loads, None)
    assert (choice.node_id, choice.reason) == (node, "latency")


@pytest.mark.parametrize(("pick", "node"), [(0.0, "a"), (0.33, "a"), (0.34, "b"), (0.67, "c"), (0.999999, "c")])
def test_random(pick: float, node: str) -> None:
    choice = choose_node(request(Strategy.RANDOM, random_pick=pick), {}, None)
    assert (choice.node_id, choice.reason) == (node, "random")


def test_no_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        choose_node(request(candidates=()), {}, None)
