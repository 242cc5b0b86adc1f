"""The first layer's requantization taken as it is on a sub-box, not as half a step.

A quantized runtime rounds each first-layer output to its grid (`SpecChain.lattice`); the spec
charges that as half a step either way at every point (`SpecChain.err[0]`). On a box of 0/1
generators a convolution's output depends on few of them (3-9 on the MNIST CNN's feature
regions), so it takes few values there, and the rounding's actual range over them is known:
the box's spec takes its midpoint into the bias and its half-width as the error. On the MNIST
CNN's int8 copy (features r=10) that range is 68-85% of the half step, narrower as branch and
bound fixes generators: the worst margin's bound rises 0.2-0.4 logits at the root, 0.4-0.8
deeper (`benchmarks/bench_bound_gap.py`).

Sound for any rounding rule (half away from zero or to even): the runtime's value before the
rounding lies within the rest of the spec's error (float32 or fixed-point scaling, the
multiplier's own rounding, the input's rounding, a clamp's move) of the spec's value, and every
grid point a value in that range can round to is counted. The box's spec holds on the box and
its sub-boxes only.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from verifier.engine.bounds import SpecChain, _first_err
from verifier.engine.network import Affine
from verifier.engine.regions import EPS

# A neuron depending on more free generators keeps the half step: its 2^k values cost more
# to list than the rounding's range gains (9: every first-layer neuron of the MNIST CNN).
MAX_FREE = 9
_SUBSETS = {k: np.array(list(itertools.product((0.0, 1.0), repeat=k))) for k in range(MAX_FREE + 1)}
# float64 noise in the listed values, in grid steps: a value this close to a rounding
# boundary is counted on both sides of it
NOISE_STEPS = 1e-9


def applies(spec: SpecChain, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether `on_box` can narrow this spec's first rounding on [lo, hi]: the first layer's
    outputs lie on a grid, and the box's generators are 0/1 (a feature region's)."""
    return (
        spec.lattice is not None
        and spec.lattice[0] is not None
        and isinstance(spec.layers[0], Affine)
        and spec.err[0] is not None
        and bool(np.all(lo >= 0) and np.all(hi - lo <= 1))
    )


def on_box(spec: SpecChain, lo: np.ndarray, hi: np.ndarray) -> SpecChain:
    """The spec on the box [lo, hi]: each first-layer output with at most `MAX_FREE` free
    generators charged the range its rounding takes over the box's points (see the module
    docstring); the spec itself where that does not apply."""
    if not applies(spec, lo, hi):
        return spec
    layer = spec.layers[0]
    w, b = layer.weight, layer.bias
    step, origin = spec.lattice[0]
    step = np.broadcast_to(np.asarray(step, dtype=np.float64), b.shape)
    origin = np.broadcast_to(np.asarray(origin, dtype=np.float64), b.shape)
    region = spec.region
    fixed = lo.astype(np.float64)
    left = region.budget - float(region.cost @ fixed)
    if left < 0:  # no point in the box: its bounds say so
        return spec
    base = b + w @ fixed
    err = _first_err(spec)
    # the runtime's value before rounding is within this of the spec's, in steps
    slack = np.maximum(err / step - 0.5, 0.0) + NOISE_STEPS
    free = (w != 0) & (hi > lo)[None, :]
    k = free.sum(axis=1)
    shift, half = np.zeros(len(b)), err.copy()
    for n in np.unique(k[k <= MAX_FREE]):
        rows = np.flatnonzero(k == n)
        cols = np.nonzero(free[rows])[1].reshape(len(rows), n)
        subsets = _SUBSETS[int(n)]
        t = base[rows, None] + np.take_along_axis(w[rows], cols, axis=1) @ subsets.T
        t = (t - origin[rows, None]) / step[rows, None]
        within = region.cost[cols] @ subsets.T <= left + EPS  # the empty subset always is
        d = slack[rows, None]
        low = np.where(within, np.ceil(t - d - 0.5) - t, np.inf).min(axis=1)
        high = np.where(within, np.floor(t + d + 0.5) - t, -np.inf).max(axis=1)
        shift[rows] = (low + high) / 2 * step[rows]
        half[rows] = (high - low) / 2 * step[rows]
    narrowed = half < err
    if not np.any(narrowed):
        return spec
    # a narrowed output's range holds its input rounding too: the spec's `first_input` (kept
    # for the others, whose charge it makes exact) charges it once more there, a few 1e-6
    layers = [Affine(w, b + np.where(narrowed, shift, 0.0)), *spec.layers[1:]]
    first = np.where(narrowed, half, spec.err[0])
    return replace(spec, layers=layers, err=[first, *spec.err[1:]])
