"""Ladders: every point of a region is reached from `x` by single manipulations.

A ladder to coefficients `s` moves one generator by one unit at a time (generator 0 first, then
1, ...), always away from 0, so `|s_g|` and hence the cost only grow along it and every rung lies
in the region. The union of the ladders of a set of points (say, a search's IP and EP) is a
directed graph whose edges are single manipulations; `save_ladders` writes it for inspection.

In a run, `margin_ladders` follows each refuted input from `x` to its counterexample (and, in
MCTS mode, to the explored IP / EP points) with every model's margin at each rung, so the
report shows where each model flips; `margin_graph` is the run's `ladders.graphml`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from verifier.engine.regions import Region


def ladder(region: Region, coeffs: np.ndarray) -> list[np.ndarray]:
    """Coefficient vectors from 0 to `coeffs`, one unit of one generator per step."""
    target = np.asarray(coeffs, dtype=np.int64).reshape(-1)
    if target.shape != (region.num_generators,):
        raise ValueError(f"expected {region.num_generators} coefficients, got {target.shape}")
    if not region.contains(target)[0]:
        raise ValueError("the coefficients are not a point of the region")
    cur = np.zeros_like(target)
    rungs = [cur.copy()]
    for g in np.flatnonzero(target):
        step = 1 if target[g] > 0 else -1
        for _ in range(abs(int(target[g]))):
            cur[g] += step
            rungs.append(cur.copy())
    return rungs


def ladder_graph(
    region: Region, points: np.ndarray, kinds: Sequence[str] | None = None
) -> nx.DiGraph:
    """Union of the ladders of `points` (k, G); node = coefficient tuple, edge = one manipulation.

    Nodes carry `cost` (L1 distance) and `depth` (number of manipulations); the endpoints also
    carry `kind` (e.g. "ineffective" / "effective") when `kinds` gives one per point.
    """
    pts = np.asarray(points, dtype=np.int64).reshape(-1, region.num_generators)
    if kinds is not None and len(kinds) != len(pts):
        raise ValueError(f"{len(kinds)} kinds for {len(pts)} points")
    graph = nx.DiGraph(
        generators=region.num_generators,
        family=region.family,
        budget=float(region.budget),
        step=float(region.step),
    )
    for i, p in enumerate(pts):
        prev = None
        for rung in ladder(region, p):
            node = tuple(int(v) for v in rung)
            if node not in graph:
                graph.add_node(
                    node, cost=float(np.abs(rung) @ region.cost), depth=int(np.abs(rung).sum())
                )
            if prev is not None:
                g = int(np.flatnonzero(np.asarray(node) != np.asarray(prev))[0])
                graph.add_edge(prev, node, generator=g, sign=node[g] - prev[g])
            prev = node
        if kinds is not None:
            graph.nodes[prev]["kind"] = str(kinds[i])
    return graph


def save_ladders(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write the ladder graph: GraphML for a `.graphml` path, else JSON node-link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = {node: ",".join(str(v) for v in node) for node in graph.nodes}
    if path.suffix.lower() == ".graphml":
        nx.write_graphml(nx.relabel_nodes(graph, ids), path)
        return path
    data = {
        "directed": True,
        "graph": dict(graph.graph),
        "nodes": [{"id": ids[n], "coeffs": list(n), **graph.nodes[n]} for n in graph.nodes],
        "links": [
            {"source": ids[a], "target": ids[b], **graph.edges[a, b]} for a, b in graph.edges
        ],
    }
    path.write_text(json.dumps(data, indent=1))
    return path


@dataclass(frozen=True)
class MarginLadder:
    """One input's ladders (its counterexample's, or a search's explored points) with every
    model's margin `logit[label] - max other` and label at each rung."""

    index: int  # the input's dataset index
    label: int  # its true label
    rungs: np.ndarray  # (k, G) int64: coefficient vectors, each ladder from 0 in order
    ladder: np.ndarray  # (k,) int: which ladder (endpoint) each rung belongs to
    kinds: tuple[str, ...]  # per ladder: "counterexample", "effective" or "ineffective"
    margins: dict[str, np.ndarray]  # model -> (k,) float64
    labels: dict[str, np.ndarray]  # model -> (k,) int64


def margin_ladders(
    cases: Sequence[tuple[int, int, Region, np.ndarray, Sequence[str]]], runtimes: dict
) -> list[MarginLadder]:
    """The ladders to each case's endpoints (index, label, region, endpoints (m, G), kinds) with
    each runtime's margins: every rung of every case goes to one `predict` call per model."""
    from verifier.engine.points import runtime_inputs

    if not cases or not runtimes:
        return []
    parts, pieces = [], []
    for index, label, region, ends, kinds in cases:
        ends = np.asarray(ends, dtype=np.int64).reshape(-1, region.num_generators)
        per = [np.stack(ladder(region, e)) for e in ends]
        rungs = np.concatenate(per)
        which = np.repeat(np.arange(len(per)), [len(p) for p in per])
        parts.append((index, label, rungs, which, tuple(kinds)))
        pieces.append(runtime_inputs(None, region, rungs))  # flat (k, n) float32
    x = np.concatenate(pieces)
    true = np.concatenate([np.full(len(p[2]), p[1]) for p in parts])
    margins, labels = {}, {}
    for name, runtime in runtimes.items():
        logits = np.asarray(runtime.predict(x.reshape((len(x), *_shape(runtime, x)))))
        margins[name], labels[name] = _margins(logits.astype(np.float64), true)
    out, start = [], 0
    for index, label, rungs, which, kinds in parts:
        span = slice(start, start + len(rungs))
        out.append(
            MarginLadder(
                index,
                label,
                rungs,
                which,
                kinds,
                {n: m[span] for n, m in margins.items()},
                {n: v[span] for n, v in labels.items()},
            )
        )
        start += len(rungs)
    return out


def _shape(runtime, x: np.ndarray) -> tuple[int, ...]:
    shape = getattr(runtime, "input_shape", None)
    return tuple(shape) if shape else x.shape[1:]


def _margins(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: `logit[label] - max other logit`, and the argmax label."""
    rows = np.arange(len(logits))
    own = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return own - others.max(axis=1), logits.argmax(axis=1)


def margin_graph(ladders: Sequence[MarginLadder]) -> nx.DiGraph:
    """One graph of every input's ladders: a node per rung (id `index:coeffs`) with its input,
    depth, coefficients, each model's margin and label; an edge per manipulation."""
    graph = nx.DiGraph(name="ladders")
    for lad in ladders:
        prev = None
        for k, rung in enumerate(lad.rungs):
            coeffs = ",".join(str(int(v)) for v in rung)
            node = f"{lad.index}:{coeffs}"
            if node not in graph:
                attrs = {
                    "input": lad.index,
                    "label": lad.label,
                    "depth": int(np.abs(rung).sum()),
                    "coeffs": coeffs,
                }
                for name in lad.margins:
                    attrs[f"margin_{name}"] = float(lad.margins[name][k])
                    attrs[f"label_{name}"] = int(lad.labels[name][k])
                graph.add_node(node, **attrs)
            start = k == 0 or lad.ladder[k] != lad.ladder[k - 1]
            if not start and prev is not None and not graph.has_edge(prev, node):
                g = int(np.flatnonzero(rung != lad.rungs[k - 1])[0])
                graph.add_edge(prev, node, generator=g)
            end = k == len(lad.rungs) - 1 or lad.ladder[k + 1] != lad.ladder[k]
            if end:  # a point reached by several ladders keeps its first kind
                graph.nodes[node].setdefault("kind", lad.kinds[int(lad.ladder[k])])
            prev = node
    return graph


def graphml(graph: nx.DiGraph) -> str:
    """The graph as GraphML text (for `store.write_atomic`)."""
    return "\n".join(nx.generate_graphml(graph)) + "\n"
