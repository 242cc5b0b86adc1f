"""Ladders: every point of a region is reached from `x` by single manipulations.

A ladder to coefficients `s` moves one generator by one unit at a time (generator 0 first, then
1, ...), always away from 0, so `|s_g|` and hence the cost only grow along it and every rung lies
in the region. The union of the ladders of a set of points (say, a search's IP and EP) is a
directed graph whose edges are single manipulations; `save_ladders` writes it for inspection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import networkx as nx
import numpy as np

from verifier.regions import Region


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
