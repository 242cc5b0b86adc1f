"""The paper's search: DLV's single-player Monte-Carlo tree search over feature subsets.

A node is a set of chosen features (a point of a `features` region, s_g in {0,1}); its children
add one more feature that still fits the radius. Each iteration descends from the current root
by UCT to a node not yet expanded, expands all its children, and runs random rollouts from each
(features added in random order until the next one would exceed the radius). Every point on
every rollout path (the rollout's ladder) is evaluated on the runtime, a whole batch of paths in
one `predict` call, and remembered: correctly classified points are the paper's IP, the others
its EP (`evaluate="endpoint"` runs only the start and end of each path). A rollout is worth 1
when its path reaches a misclassified point, else up to 0.5 by how far its best point lowered
the label's logit margin (the paper's code rewarded only misclassification).

As in DLV, after `level_rollouts` rollouts the root moves to its best child (most visits, then
best mean value) and the search goes on below it, until the root is misclassified or can grow no
further, or the rollout or time budget ends. (The paper's code reset its overall timer wrongly and
stopped after the first move; this one keeps moving over the whole budget.) The search never
certifies: it answers refuted (with confirmed runtime counterexamples) or not-refuted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import numpy as np

from verifier.engine.points import predict_points
from verifier.engine.regions import EPS, FAMILIES, Region
from verifier.engine.result import NOT_REFUTED, REFUTED, Decision


@dataclass
class SearchResult:
    """The decision, the evaluated points (IP and EP as 0/1 coefficient rows) and the tree."""

    decision: Decision
    ip: np.ndarray  # (k, G) int8: evaluated points the runtime still classifies `label`
    ep: np.ndarray  # (m, G) int8: evaluated points it misclassifies (confirmed), found order
    ep_labels: np.ndarray  # (m,) int64: the runtime's label at each EP point
    rollouts: int
    evaluations: int
    moves: int
    seconds: float
    _source: tuple = field(default=(), repr=False)

    @cached_property
    def tree(self) -> nx.DiGraph:
        """The search tree (built on first use): node = sorted tuple of chosen features, with
        visits, value (total reward), effective, margin, label and root_path attributes."""
        return _graph(*self._source)


@dataclass
class _State:
    """Search bookkeeping: node statistics keyed by feature bitmask, and the evaluation cache."""

    region: Region
    label: int
    movable: np.ndarray  # (G,) bool
    visits: dict[int, int] = field(default_factory=dict)
    value: dict[int, float] = field(default_factory=dict)
    children: dict[int, list[int]] = field(default_factory=dict)
    evaluated: dict[int, tuple[float, int]] = field(default_factory=dict)  # margin, label
    rows: list[np.ndarray] = field(default_factory=list)  # evaluated points, in order
    margin0: float = 1.0
    found: bool = False  # some evaluated point is misclassified
    path_points: int = 0  # points on rollout paths, before de-duplication


def _masks(rows: np.ndarray) -> list[int]:
    """Bitmask (Python int, bit g = feature g) of each bool row."""
    packed = np.packbits(rows, axis=1, bitorder="little")
    return [int.from_bytes(r.tobytes(), "little") for r in packed]


def _bits(mask: int, g: int) -> np.ndarray:
    """The bool row of a bitmask."""
    raw = np.frombuffer(mask.to_bytes((g + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:g].astype(bool)


def _features(mask: int) -> tuple[int, ...]:
    """The sorted features of a bitmask."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return tuple(out)


def _evaluate(st: _State, runtime, rows: np.ndarray, keys: list[int]) -> None:
    """Run the runtime once on the rows not seen before and cache (margin, label) per key."""
    new, seen = [], set()
    for i, k in enumerate(keys):
        if k not in st.evaluated and k not in seen:
            seen.add(k)
            new.append(i)
    if not new:
        return
    pts = rows[new]
    logits = predict_points(runtime, st.region, pts.astype(np.int64)).astype(np.float64)
    labels = logits.argmax(axis=1)
    others = np.delete(logits, st.label, axis=1)
    margins = logits[:, st.label] - others.max(axis=1) if others.shape[1] else logits[:, 0] * 0
    for i, m, lab in zip(new, margins, labels, strict=True):
        st.evaluated[keys[i]] = (float(m), int(lab))
    st.rows.append(pts)
    st.found = st.found or bool(np.any(labels != st.label))


def _reward(st: _State, keys: list[int]) -> float:
    """1 if a point of the path is misclassified, else 0.5 * the relative drop of the margin."""
    best = math.inf
    for k in keys:
        m, lab = st.evaluated[k]
        if lab != st.label:
            return 1.0
        best = min(best, m)
    return 0.5 * min(max((st.margin0 - best) / st.margin0, 0.0), 1.0)


def _rollouts(
    st: _State, runtime, starts: np.ndarray, rng: np.random.Generator, whole_path: bool
) -> list[float]:
    """Random rollouts from the bool start rows, evaluated in one batch: every point of each
    path (DLV), or only its start and end."""
    region = st.region
    b, g = starts.shape
    avail = st.movable & ~starts
    room = region.budget + EPS - starts @ region.cost
    order = np.argsort(np.where(avail, rng.random((b, g)), np.inf), axis=1, kind="stable")
    step_cost = np.where(np.take_along_axis(avail, order, axis=1), region.cost[order], np.inf)
    length = (np.cumsum(step_cost, axis=1) <= room[:, None]).sum(axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(g)[None, :].repeat(b, axis=0), axis=1)
    depth = np.arange(int(length.max()) + 1)
    paths = starts[:, None, :] | (rank[:, None, :] < depth[None, :, None])  # (b, d, g)
    valid = depth[None, :] <= length[:, None]
    if not whole_path:
        valid &= (depth[None, :] == 0) | (depth[None, :] == length[:, None])
    flat = paths[valid]
    st.path_points += len(flat)
    keys = _masks(flat)
    _evaluate(st, runtime, flat, keys)
    bounds = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    return [_reward(st, keys[bounds[i] : bounds[i + 1]]) for i in range(b)]


def _uct_child(st: _State, node: int, exploration: float) -> int:
    """The child with the best upper confidence bound; unvisited children first."""
    log_n = math.log(max(st.visits.get(node, 0), 1))
    best, best_score = -1, -math.inf
    for c in st.children[node]:
        n = st.visits.get(c, 0)
        if n == 0:
            return c
        score = st.value[c] / n + exploration * math.sqrt(log_n / n)
        if score > best_score:
            best, best_score = c, score
    return best


def _expand(st: _State, node: int) -> tuple[list[int], np.ndarray]:
    """Children of `node` (one more movable feature that still fits the radius), as masks and
    as bool rows."""
    chosen = _bits(node, len(st.movable))
    room = st.region.budget + EPS - float(chosen @ st.region.cost)
    fit = np.flatnonzero(st.movable & ~chosen & (st.region.cost <= room))
    kids = [node | (1 << int(f)) for f in fit]
    st.children[node] = kids
    rows = np.repeat(chosen[None], len(fit), axis=0)
    rows[np.arange(len(fit)), fit] = True
    return kids, rows


def _terminal(st: _State, node: int) -> bool:
    """Misclassified, or expanded with no child (the radius is used up)."""
    if st.evaluated[node][1] != st.label:
        return True
    return node in st.children and not st.children[node]


def _backup(st: _State, path: list[int], node: int, reward: float) -> None:
    for n in [*path, node] if node != path[-1] else path:
        st.visits[n] = st.visits.get(n, 0) + 1
        st.value[n] = st.value.get(n, 0.0) + reward


def _best_child(st: _State, node: int) -> int:
    """The robust child: most visits, then best mean value, then smallest mask."""
    kids = st.children.get(node, [])
    visited = [c for c in kids if st.visits.get(c, 0) > 0]
    if not visited:
        return -1
    return max(visited, key=lambda c: (st.visits[c], st.value[c] / st.visits[c], -c))


def _default_level(region: Region, movable: np.ndarray, rollouts: int, batch: int) -> int:
    """Rollouts per move: the budget spread over the deepest possible descent."""
    costs = np.sort(region.cost[movable])
    depth = int((np.cumsum(costs) <= region.budget + EPS).sum()) if len(costs) else 1
    return max(batch, rollouts // max(depth, 1))


def mcts_search(
    runtime,
    region: Region,
    label: int,
    *,
    rollouts: int = 1000,
    time_budget: float | None = None,
    exploration: float = 0.5,
    seed: int = 0,
    batch: int = 64,
    level_rollouts: int | None = None,
    stop_on_first: bool = False,
    evaluate: str = "path",
) -> SearchResult:
    """DLV's MCTS on a features region (see the module docstring); never certifies.

    `rollouts` and `time_budget` bound the whole search (checked between expansions, so the last
    expansion may overshoot `rollouts` by up to one batch), `level_rollouts` each move of the
    root (default: `rollouts` spread over the deepest possible descent). `batch` is the target
    number of rollouts per `predict` call. Same seed and budgets give the same result unless the
    time budget cuts the search. `exploration` is UCT's constant (DLV's cp = 0.5). `evaluate`:
    "path" runs every point of a rollout on the runtime, as DLV did; "endpoint" only its start
    and end (about 4x fewer evaluations on MNIST, fewer IP points).
    """
    if evaluate not in ("path", "endpoint"):
        raise ValueError(f"evaluate must be 'path' or 'endpoint', got {evaluate!r}")
    if not FAMILIES[region.family].subsets or np.any(region.lo != 0) or np.any(region.hi > 1):
        raise ValueError("mcts_search needs a features region (coefficients in {0, 1})")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    g = region.num_generators
    movable = (region.hi == 1) & (region.cost <= region.budget + EPS)
    st = _State(region, int(label), movable)
    root = 0
    _evaluate(st, runtime, np.zeros((1, g), bool), [root])
    st.margin0 = max(abs(st.evaluated[root][0]), 1e-12)
    level = level_rollouts or _default_level(region, movable, rollouts, batch)
    used, since_move, moves, stopped = 0, 0, 0, "rollouts"
    root_path = [root]
    while used < rollouts:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            stopped = "time"
            break
        if stop_on_first and st.found:
            stopped = "found"
            break
        if _terminal(st, root):
            stopped = "root-effective" if st.evaluated[root][1] != label else "radius"
            break
        if since_move >= level:
            nxt = _best_child(st, root)
            if nxt < 0:
                stopped = "radius"
                break
            root, since_move, moves = nxt, 0, moves + 1
            root_path.append(root)
            continue
        path = [root]
        while path[-1] in st.children and not _terminal(st, path[-1]):
            path.append(_uct_child(st, path[-1], exploration))
        leaf = path[-1]
        kids, rows = ([], None) if _terminal(st, leaf) else _expand(st, leaf)
        if not kids:  # a terminal leaf: its own point is its value
            _backup(st, path, leaf, _reward(st, [leaf]))
            used, since_move = used + 1, since_move + 1
            continue
        per_child = max(1, round(batch / len(kids)))
        starts = np.repeat(rows, per_child, axis=0)
        rewards = _rollouts(st, runtime, starts, rng, evaluate == "path")
        for i, r in enumerate(rewards):
            _backup(st, path, kids[i // per_child], r)
        used += len(rewards)
        since_move += len(rewards)
    return _result(st, used, moves, root_path, stopped, time.perf_counter() - start)


def _result(st: _State, used: int, moves: int, root_path: list[int], stopped: str, seconds):
    """Assemble IP / EP, the decision and the tree."""
    g = st.region.num_generators
    rows = np.concatenate(st.rows) if st.rows else np.zeros((0, g), bool)
    labels = np.array([lab for _, lab in st.evaluated.values()], dtype=np.int64)
    bad = labels != st.label
    ep, ip = rows[bad].astype(np.int8), rows[~bad].astype(np.int8)
    ep_labels = labels[bad]
    detail = {
        "rollouts": used,
        "evaluations": len(labels),
        "path_points": st.path_points,
        "moves": moves,
        "stopped": stopped,
        "ineffective": int(len(ip)),
        "effective": int(len(ep)),
        "rollouts_per_second": used / seconds if seconds > 0 else 0.0,
        "root": [int(i) for i in np.flatnonzero(_bits(root_path[-1], g))],
    }
    if len(ep):
        l1 = np.abs(ep) @ st.region.cost
        k = int(np.argmin(l1))  # first of the smallest, in found order
        detail.update(
            first_l1=float(l1[0]),
            minimal_l1=float(l1[k]),
            minimal_l1_coeffs=ep[k].astype(np.int64).tolist(),
            minimal_l1_adv_label=int(ep_labels[k]),
        )
        decision = Decision(
            REFUTED, "mcts", ep[0].astype(np.int64), int(ep_labels[0]), seconds, used, detail
        )
    else:
        decision = Decision(NOT_REFUTED, "mcts", None, None, seconds, used, detail)
    return SearchResult(
        decision, ip, ep, ep_labels, used, len(labels), moves, seconds, (st, set(root_path))
    )


def _graph(st: _State, on_root_path: set[int]) -> nx.DiGraph:
    """The search tree: node = sorted tuple of features; visits, value, effective, margin."""
    name = _features
    tree = nx.DiGraph()
    nodes = sorted(set(st.children) | set(st.visits) | {0})
    for n in nodes:
        margin, lab = st.evaluated.get(n, (math.nan, -1))
        tree.add_node(
            name(n),
            visits=st.visits.get(n, 0),
            value=st.value.get(n, 0.0),
            effective=bool(lab != st.label and lab >= 0),
            evaluated=n in st.evaluated,
            margin=margin,
            label=lab,
            root_path=n in on_root_path,
        )
    present = set(nodes)
    for parent, kids in st.children.items():
        for k in kids:
            if k in present:
                tree.add_edge(name(parent), name(k), feature=int((k ^ parent).bit_length() - 1))
    return tree
