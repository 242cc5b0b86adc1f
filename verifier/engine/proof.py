"""The kept proof of a certified region: the tree of sub-boxes that covers it, each leaf closed.

A proof is the region's generator box split recursively: an internal node names a generator
`g` and a cut `mid` (children `[lo, mid]` and `[mid + 1, hi]` on `g`, the other ranges kept),
a leaf names the route that closed its box and that route's evidence:

- `bounds`: the worst margin lower bound minus the threshold (float32, rounded down), > 0;
- `empty`: the box's least cost (its point nearest 0), over the budget: no point;
- `enumeration`: the box's point count, every point run on the runtime;
- `sieve`: the points run on the runtime: those where the box's linear margin bounds are not
  positive and neither are its bounds with the first layer exact at the point (every other
  point is above one of them; the checker re-bounds and re-runs with its own code);
- `z3`: no evidence (z3 answered unsat on the box);
- `milp`: no evidence (the mixed-integer program proved every margin positive on the box).

A `fold` node (no payload) has one child on its own box: the box is a sub-region of the
dynamic-range input fold (`verifier.engine.dynamic_input.split_for_fold`), and the bounds leaves
below it are on that sub-region's folded spec, not the region's.

Boxes are not stored: they follow from the root (the region's box) and the splits, so a tree
that parses covers the region by construction. Whole-region routes are trees of one leaf.
Encoding: a header (magic, what bounds were computed on, the number of generators) and the
nodes in preorder, one tag byte each and a fixed payload per tag, zlib-compressed. A new closing
route is a new tag in `KINDS` with its payload format, and a re-check in `verifier.run.proofcheck`.
"""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"RRP1"
# What bounds leaves were computed on: no bounds leaf, the float chain with its float32
# rounding, or a quantized runtime's error model.
SPECS = ("none", "float32", "error-model")
SPLIT = "split"
FOLD = "fold"
# kind -> (tag, struct format of the payload, payload field names). Append new kinds with a new
# tag; never reuse one.
KINDS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    SPLIT: (0, "<Ii", ("g", "mid")),
    "bounds": (1, "<f", ("margin",)),
    "empty": (2, "<f", ("min_cost",)),
    "enumeration": (3, "<I", ("points",)),
    "z3": (4, "", ()),
    "milp": (5, "", ()),
    FOLD: (6, "", ()),
    "sieve": (7, "<I", ("points",)),
}
_BY_TAG = {tag: (kind, fmt, names) for kind, (tag, fmt, names) in KINDS.items()}
_HEADER = "<4sBI"


class ProofFormatError(ValueError):
    """The bytes are not a proof this version can read (truncated, unknown tag, bad header)."""


@dataclass(frozen=True)
class Node:
    """One node in preorder: a split (`g`, `mid`) or a leaf with its evidence."""

    kind: str
    values: tuple

    def get(self, name: str):
        """The payload field `name` (see `KINDS`)."""
        return self.values[KINDS[self.kind][2].index(name)]


@dataclass(frozen=True)
class Proof:
    """The cover of one certified region (see the module docstring)."""

    spec: str  # one of SPECS
    generators: int
    nodes: tuple[Node, ...]  # preorder

    def leaves(self) -> dict[str, int]:
        """Leaves per closing route."""
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.kind not in (SPLIT, FOLD):
                out[n.kind] = out.get(n.kind, 0) + 1
        return out


def leaf(kind: str, *values) -> Node:
    """A leaf node, its payload checked against `KINDS`."""
    if kind not in KINDS or kind in (SPLIT, FOLD):
        raise ValueError(f"unknown leaf kind {kind!r}")
    if len(values) != len(KINDS[kind][2]):
        raise ValueError(f"a {kind} leaf holds {KINDS[kind][2]}")
    return Node(kind, tuple(values))


def margin_evidence(value: float) -> float:
    """`value` as float32 rounded down: a stored lower bound never exceeds the computed one."""
    f = np.float32(value)
    if float(f) > value:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def single(spec: str, generators: int, kind: str, *values) -> Proof:
    """A whole-region proof: one leaf."""
    return Proof(spec, generators, (leaf(kind, *values),))


def _key(lo: np.ndarray, hi: np.ndarray) -> bytes:
    return np.asarray(lo, np.int64).tobytes() + np.asarray(hi, np.int64).tobytes()


class Cover:
    """Records splits and closed leaves as a search makes them (keyed by box: in a tree of
    strict splits no two nodes share a box), then reads the tree off from the root."""

    def __init__(self) -> None:
        self._splits: dict[bytes, tuple[int, int]] = {}
        self._leaves: dict[bytes, Node] = {}
        self._folds: set[bytes] = set()

    def split(self, lo: np.ndarray, hi: np.ndarray, g: int, mid: int) -> None:
        """The box [lo, hi] was cut on generator `g` after `mid`."""
        self._splits[_key(lo, hi)] = (int(g), int(mid))

    def fold(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """The box [lo, hi] is a sub-region of the input fold (its own spec below)."""
        self._folds.add(_key(lo, hi))

    def close(self, lo: np.ndarray, hi: np.ndarray, kind: str, *values) -> None:
        """The box [lo, hi] was closed by route `kind` with its evidence."""
        self._leaves[_key(lo, hi)] = leaf(kind, *values)

    def tree(self) -> Cover:
        """A cover with this one's splits and empty leaves only (no point, whatever the spec):
        what another spec's proof over the same boxes starts from, closing the other leaves."""
        out = Cover()
        out._splits = dict(self._splits)
        out._leaves = {k: n for k, n in self._leaves.items() if n.kind == "empty"}
        return out

    def proof(self, lo: np.ndarray, hi: np.ndarray, spec: str) -> Proof:
        """The tree under the root box [lo, hi]; ValueError when a box in it is still open."""
        nodes: list[Node] = []
        stack = [(np.asarray(lo, np.int64), np.asarray(hi, np.int64), False)]
        while stack:
            a, b, marked = stack.pop()
            k = _key(a, b)
            if k in self._folds and not marked:
                nodes.append(Node(FOLD, ()))
                stack.append((a, b, True))
                continue
            if k in self._leaves:
                nodes.append(self._leaves[k])
                continue
            if k not in self._splits:
                raise ValueError("the cover leaves a box open")
            g, mid = self._splits[k]
            nodes.append(Node(SPLIT, (g, mid)))
            left_hi, right_lo = b.copy(), a.copy()
            left_hi[g], right_lo[g] = mid, mid + 1
            stack.append((right_lo, b, False))  # popped after the whole left subtree
            stack.append((a, left_hi, False))
        return Proof(spec, len(lo), tuple(nodes))


def encode(proof: Proof) -> bytes:
    """The compact binary form (zlib-compressed)."""
    parts = [struct.pack(_HEADER, MAGIC, SPECS.index(proof.spec), proof.generators)]
    for n in proof.nodes:
        tag, fmt, _ = KINDS[n.kind]
        parts.append(bytes([tag]) + (struct.pack(fmt, *n.values) if fmt else b""))
    return zlib.compress(b"".join(parts), 9)


def decode(data: bytes) -> Proof:
    """The proof in `encode`'s bytes; ProofFormatError when they are not one."""
    try:
        raw = zlib.decompress(data)
    except zlib.error as exc:
        raise ProofFormatError(f"not a compressed proof: {exc}") from None
    head = struct.calcsize(_HEADER)
    if len(raw) < head:
        raise ProofFormatError("truncated header")
    magic, spec, generators = struct.unpack_from(_HEADER, raw)
    if magic != MAGIC or spec >= len(SPECS):
        raise ProofFormatError("not a proof of this format")
    nodes: list[Node] = []
    pos = head
    while pos < len(raw):
        tag = raw[pos]
        if tag not in _BY_TAG:
            raise ProofFormatError(f"unknown node tag {tag}")
        kind, fmt, _ = _BY_TAG[tag]
        size = struct.calcsize(fmt) if fmt else 0
        if pos + 1 + size > len(raw):
            raise ProofFormatError("truncated node")
        values = struct.unpack_from(fmt, raw, pos + 1) if fmt else ()
        nodes.append(Node(kind, tuple(values)))
        pos += 1 + size
    return Proof(SPECS[spec], generators, tuple(nodes))


def to_text(proof: Proof) -> str:
    """The encoded proof as ASCII (what a decision's detail carries to the run store)."""
    return base64.b64encode(encode(proof)).decode("ascii")


def from_text(text: str) -> bytes:
    """The encoded bytes back from `to_text`'s ASCII."""
    return base64.b64decode(text.encode("ascii"))
