"""DLV's MCTS over feature subsets, and ladders through regions."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest

from verifier.engine.ladders import (
    graphml,
    ladder,
    ladder_graph,
    margin_graph,
    margin_ladders,
    save_ladders,
)
from verifier.engine.network import Affine, Relu, forward_lowered
from verifier.engine.regions import Region, feature_region, lattice_region
from verifier.engine.result import CERTIFIED, NOT_REFUTED, REFUTED
from verifier.engine.search import mcts_search


class ChainRuntime:
    """A runtime running the lowered chain (float32 out, like onnxruntime); counts calls."""

    def __init__(self, chain, n: int):
        self.chain, self.input_shape, self.calls = chain, (n,), 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        return forward_lowered(self.chain, flat).astype(np.float32)

    def classify(self, region: Region, s: np.ndarray) -> np.ndarray:
        pts = region.points(np.asarray(s, np.int64)).astype(np.float32)
        return self.predict(pts).argmax(axis=1)


def f32(a) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float64)


def random_case(seed: int) -> tuple[ChainRuntime, Region, int]:
    """16 inputs, 8 features of 2 values, step 0.5, radius 3 (93 points)."""
    rng = np.random.default_rng(seed)
    n = 16
    chain = [
        Affine(f32(rng.normal(0, 1.5 / 4, (12, n))), f32(rng.normal(0, 0.2, 12))),
        Relu(),
        Affine(f32(rng.normal(0, 1.5 / np.sqrt(12), (3, 12))), f32(rng.normal(0, 0.2, 3))),
    ]
    x = f32(rng.random(n))
    label = int(forward_lowered(chain, x[None]).argmax())
    region = feature_region(x, [np.arange(2 * i, 2 * i + 2) for i in range(8)], 0.5, 3.0)
    return ChainRuntime(chain, n), region, label


MIXED, ROBUST = 3, 6  # seeds: 9 of 93 points misclassified (>= 2 features); none misclassified


def deep_case() -> tuple[ChainRuntime, Region]:
    """20 one-value features; label 0 is lost only with all of features 0-4 and at most one other.

    Hidden unit i is 1 when feature i is chosen; margin = 4.3 - (targets chosen) + 0.5 (others
    chosen). The radius allows 7 features, so the effective points sit at depth 5 or 6 and a
    random ladder passes one with probability about 1/2600.
    """
    n = 20
    w = np.where(np.arange(n) < 5, -1.0, 0.5)
    chain = [
        Affine(np.eye(n) * 4.0, np.full(n, -1.0)),
        Relu(),
        Affine(np.stack([w, np.zeros(n)]), np.array([4.3, 0.0])),
    ]
    region = feature_region(np.full(n, 0.25), [np.array([i]) for i in range(n)], 0.25, 7 * 0.25)
    return ChainRuntime(chain, n), region


@pytest.mark.parametrize("evaluate", ["path", "endpoint"])
def test_recorded_points_are_what_the_runtime_says(evaluate):
    rt, region, label = random_case(MIXED)
    res = mcts_search(rt, region, label, rollouts=300, seed=0, batch=32, evaluate=evaluate)
    assert len(res.ep) and len(res.ip)
    assert res.ip.dtype == np.int8 and res.ep.dtype == np.int8
    assert np.all(region.contains(res.ep)) and np.all(region.contains(res.ip))
    ep_labels = rt.classify(region, res.ep)
    assert np.all(ep_labels != label)
    assert np.array_equal(ep_labels, res.ep_labels)
    assert np.all(rt.classify(region, res.ip) == label)
    both = np.concatenate([res.ip, res.ep])
    assert len(np.unique(both, axis=0)) == len(both)
    assert res.evaluations == len(both)


def test_refuted_decision_carries_first_and_minimal_points():
    rt, region, label = random_case(MIXED)
    res = mcts_search(rt, region, label, rollouts=300, seed=1)
    d = res.decision
    assert d.status == REFUTED and d.route == "mcts"
    assert np.array_equal(d.coeffs, res.ep[0]) and d.coeffs.dtype == np.int64
    assert d.adv_label == res.ep_labels[0] != label
    l1 = np.abs(res.ep) @ region.cost
    assert d.detail["minimal_l1"] == pytest.approx(l1.min())
    k = d.detail["minimal_l1_coeffs"]
    assert rt.classify(region, np.array([k]))[0] == d.detail["minimal_l1_adv_label"] != label


def test_robust_case_is_not_refuted_never_certified():
    rt, region, label = random_case(ROBUST)
    res = mcts_search(rt, region, label, rollouts=200, seed=0)
    assert res.decision.status == NOT_REFUTED and res.decision.coeffs is None
    assert len(res.ep) == 0 and len(res.ip) > 1
    for seed in range(4):
        for case in (random_case(MIXED), deep_case() + (0,)):
            assert mcts_search(*case, rollouts=60, seed=seed).decision.status != CERTIFIED


def test_same_seed_same_result():
    rt, region, label = random_case(MIXED)
    a = mcts_search(rt, region, label, rollouts=200, seed=7, batch=16)
    b = mcts_search(rt, region, label, rollouts=200, seed=7, batch=16)
    assert np.array_equal(a.ip, b.ip) and np.array_equal(a.ep, b.ep)
    assert np.array_equal(a.decision.coeffs, b.decision.coeffs)
    assert a.rollouts == b.rollouts and a.moves == b.moves
    assert nx.utils.graphs_equal(a.tree, b.tree)


def test_finds_the_deep_point_by_moving_the_root():
    """The search keeps moving its root down; stopped after one level (the original code's
    timer bug: one move, then the end) it mostly misses the depth-5 point with these seeds."""
    rt, region = deep_case()
    one_level_found = 0
    for seed in range(5):
        res = mcts_search(rt, region, 0, rollouts=400, seed=seed)
        assert res.decision.status == REFUTED
        assert res.moves >= 3
        assert np.all(res.ep[:, :5] == 1) and np.all(res.ep.sum(axis=1) >= 5)
        one_level = mcts_search(rt, region, 0, rollouts=400, seed=seed, level_rollouts=10**9)
        assert one_level.moves == 0
        one_level_found += one_level.decision.status == REFUTED
    assert one_level_found < 5


def test_budgets_bound_the_search():
    rt, region = deep_case()
    res = mcts_search(rt, region, 0, rollouts=100, seed=0, batch=20)
    assert 100 <= res.rollouts < 100 + 20 * 2
    assert res.decision.nodes == res.rollouts
    rt.calls = 0
    res = mcts_search(rt, region, 0, rollouts=10**7, time_budget=0.2, seed=0)
    assert res.seconds < 2.0 and res.decision.detail["stopped"] in ("time", "root-effective")
    assert rt.calls >= 2  # evaluation is batched: far fewer calls than points
    assert rt.calls < res.evaluations


def test_stop_on_first():
    rt, region, label = random_case(MIXED)
    res = mcts_search(rt, region, label, rollouts=1000, seed=0, stop_on_first=True)
    assert res.decision.status == REFUTED and res.decision.detail["stopped"] == "found"


def test_tree_graph():
    rt, region, label = random_case(MIXED)
    res = mcts_search(rt, region, label, rollouts=200, seed=0)
    tree = res.tree
    assert isinstance(tree, nx.DiGraph) and () in tree
    assert tree.nodes[()]["visits"] > 0
    ep = {tuple(np.flatnonzero(r)) for r in res.ep}
    for node, attrs in tree.nodes(data=True):
        assert set(attrs) >= {"visits", "value", "effective"}
        if attrs["effective"]:
            assert node in ep
    for a, b, attrs in tree.edges(data=True):
        assert set(b) - set(a) == {attrs["feature"]}


def test_endpoint_mode_evaluates_fewer_points():
    rt, region = deep_case()
    path = mcts_search(rt, region, 0, rollouts=200, seed=0)
    ends = mcts_search(rt, region, 0, rollouts=200, seed=0, evaluate="endpoint")
    assert ends.decision.detail["path_points"] < path.decision.detail["path_points"]
    assert ends.decision.detail["path_points"] <= 2 * ends.rollouts


def test_rejects_bad_arguments():
    rt, region, label = random_case(MIXED)
    lattice = lattice_region(region.x, np.arange(3), 0.25, 1.0)
    with pytest.raises(ValueError, match="features region"):
        mcts_search(rt, lattice, label)
    with pytest.raises(ValueError, match="evaluate"):
        mcts_search(rt, region, label, evaluate="all")


# --- ladders ------------------------------------------------------------------------------------


def assert_ladder(region: Region, coeffs: np.ndarray, rungs: list[np.ndarray]) -> None:
    assert np.array_equal(rungs[0], np.zeros_like(coeffs))
    assert np.array_equal(rungs[-1], coeffs)
    assert len(rungs) == np.abs(coeffs).sum() + 1
    costs = [float(np.abs(r) @ region.cost) for r in rungs]
    assert costs == sorted(costs)
    for prev, cur in zip(rungs[:-1], rungs[1:], strict=True):
        assert region.contains(cur)[0]
        diff = cur - prev
        assert np.abs(diff).sum() == 1 and np.count_nonzero(diff) == 1


def test_ladders_through_a_lattice_region():
    rng = np.random.default_rng(0)
    x = rng.random(8)
    region = lattice_region(x, np.arange(4), 0.25, 1.5)
    points = np.concatenate(list(region.enumerate()))
    for s in points[rng.choice(len(points), 30, replace=False)]:
        assert_ladder(region, s, ladder(region, s))


def test_ladder_rejects_outside_points():
    region = lattice_region(np.full(4, 0.5), np.arange(4), 0.25, 0.5)
    with pytest.raises(ValueError, match="not a point"):
        ladder(region, np.array([2, 1, 0, 0]))


def test_ladder_graph_of_search_sets(tmp_path):
    rt, region, label = random_case(MIXED)
    res = mcts_search(rt, region, label, rollouts=100, seed=0)
    points = np.concatenate([res.ip, res.ep])
    kinds = ["ineffective"] * len(res.ip) + ["effective"] * len(res.ep)
    graph = ladder_graph(region, points, kinds)
    for p in points:
        assert_ladder(region, p.astype(np.int64), ladder(region, p))
        assert tuple(int(v) for v in p) in graph
    for node in graph:
        assert region.contains(np.array(node))[0]
    for a, b, attrs in graph.edges(data=True):
        diff = np.array(b) - np.array(a)
        assert np.abs(diff).sum() == 1 and diff[attrs["generator"]] == attrs["sign"]
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.nodes[tuple(int(v) for v in res.ep[0])]["kind"] == "effective"

    data = json.loads(save_ladders(graph, tmp_path / "ladders.json").read_text())
    assert len(data["nodes"]) == graph.number_of_nodes()
    assert len(data["links"]) == graph.number_of_edges()
    back = nx.read_graphml(save_ladders(graph, tmp_path / "ladders.graphml"))
    assert back.number_of_nodes() == graph.number_of_nodes()


def test_margin_ladders_follow_each_model_to_the_counterexample(tmp_path):
    rt, region, label = random_case(MIXED)
    res = mcts_search(rt, region, label, rollouts=200, seed=0)
    assert res.decision.status == REFUTED and len(res.ep) and len(res.ip)
    first = np.concatenate([res.decision.coeffs[None], res.ip[:3]]).astype(np.int64)
    cases = [
        (7, label, region, first, ["counterexample"] + ["ineffective"] * (len(first) - 1)),
        (9, label, region, res.ep[-1:].astype(np.int64), ["counterexample"]),
    ]
    runtimes = {"float": rt, "copy": ChainRuntime(rt.chain, rt.input_shape[0])}
    rt.calls = 0
    ladders = margin_ladders(cases, runtimes)
    assert rt.calls == 1 and runtimes["copy"].calls == 1  # every rung in one call per model
    for lad, (index, _, _, ends, _) in zip(ladders, cases, strict=True):
        assert lad.index == index and lad.rungs.shape[1] == region.num_generators
        rungs = lad.rungs[lad.ladder == 0]
        assert_ladder(region, ends[0], list(rungs))
        logits = rt.predict(region.points(rungs).astype(np.float32)).astype(np.float64)
        want = logits[:, label] - np.delete(logits, label, axis=1).max(axis=1)
        for name in runtimes:
            assert np.allclose(lad.margins[name][lad.ladder == 0], want)
        assert lad.labels["float"][lad.ladder == 0][-1] != label  # the counterexample flips
        assert lad.margins["float"][0] > 0  # x itself is classified correctly
        assert len(lad.kinds) == len(ends) == lad.ladder.max() + 1
    graph = margin_graph(ladders)
    path = tmp_path / "ladders.graphml"
    path.write_text(graphml(graph))
    back = nx.read_graphml(path)
    assert back.number_of_nodes() == graph.number_of_nodes() > 0
    node = "7:" + ",".join(str(int(v)) for v in first[0])
    assert back.nodes[node]["kind"] == "counterexample"
    assert {"margin_float", "margin_copy", "label_float", "coeffs"} <= set(back.nodes[node])
    for a, b in back.edges:
        ca = np.array(back.nodes[a]["coeffs"].split(","), int)
        cb = np.array(back.nodes[b]["coeffs"].split(","), int)
        assert np.abs(cb - ca).sum() == 1
