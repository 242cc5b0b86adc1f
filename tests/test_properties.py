"""Properties (hypothesis) of the region builder, the bound propagation and the aggregation.

Regions: every enumerated point is in [0,1], within the radius of `x`, moves only the selected
values by multiples of the step (lattice) or by exactly the clipped feature move (features),
`size()` counts exactly the enumerated points, and on tiny cases the lattice region is the
brute-forced set of SPEC section 3. Bounds: no lower bound exceeds the real margin at region
points. Aggregation (beside the partition property of test_relative.py): per-label counts add
up to the overall ones, every percentage is its own ratio, and the order of records is moot.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.engine.bounds import interval_bounds, linear_bounds, spec_chain
from verifier.engine.network import Affine, MaxPool, Relu, forward_lowered
from verifier.engine.regions import Region, feature_region, lattice_region
from verifier.engine.result import CERTIFIED, NOT_REFUTED, REFUTED, UNKNOWN
from verifier.run.records import InputRecord, Outcome
from verifier.run.relative import aggregate

STEPS = [2.0**-k for k in range(7)]  # 1, 1/2, ..., 1/64
TOL = 1e-9  # the regions' own rounding slack (verifier.engine.regions.EPS)

# --- strategies ---------------------------------------------------------------------------------

# Image values: 8-bit pixels (k/255) and dyadic ones (k/64, exact in binary, on the lattice).
grid_pixel = st.one_of(
    st.integers(0, 255).map(lambda k: k / 255.0), st.integers(0, 64).map(lambda k: k / 64.0)
)
pixel = st.one_of(st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False), grid_pixel)


@st.composite
def lattices(draw, max_dims=5, max_units=6, values=pixel) -> tuple[np.ndarray, Region]:
    """(x, lattice region): 1-`max_dims` positions, any step, radius of up to `max_units` steps."""
    n = draw(st.integers(1, 8))
    x = np.array(draw(st.lists(values, min_size=n, max_size=n)))
    k = draw(st.integers(1, min(n, max_dims)))
    positions = draw(st.permutations(range(n)))[:k]
    step = draw(st.sampled_from(STEPS))
    radius = step * (draw(st.integers(0, max_units)) + draw(st.floats(0.01, 0.99)))
    return x, lattice_region(x, np.array(positions), step, radius)


@st.composite
def feature_regions(draw) -> tuple[np.ndarray, Region]:
    """(x, feature region): up to 8 features of 1-4 values each, any step and radius."""
    n = draw(st.integers(1, 16))
    x = np.array(draw(st.lists(pixel, min_size=n, max_size=n)))
    order = draw(st.permutations(range(n)))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=8))
    cuts = np.cumsum(sizes)
    feats = [np.array(order[a:b]) for a, b in zip([0, *cuts], cuts, strict=False) if a < n]
    step = draw(st.sampled_from(STEPS))
    radius = draw(st.floats(0.01, 4.0))
    return x, feature_region(x, feats, step, radius)


def all_points(region: Region) -> np.ndarray:
    parts = list(region.enumerate(batch=4096))
    return np.concatenate(parts) if parts else np.zeros((0, region.num_generators), np.int64)


def common_checks(x: np.ndarray, region: Region) -> tuple[np.ndarray, np.ndarray]:
    """In [0,1], within the radius, only moved values move, no duplicates, size() counts them."""
    s = all_points(region)
    pts = region.points(s)
    assert len(s) == region.size() == len({tuple(r) for r in s.tolist()})
    assert np.all(pts >= -TOL) and np.all(pts <= 1 + TOL)
    assert np.all(np.abs(pts - x).sum(axis=1) <= region.budget + TOL)
    assert np.all(region.contains(s))
    moved = np.zeros(x.size, bool)
    for v in region.values:
        moved[v] = True
    assert np.all(pts[:, ~moved] == x[~moved])
    return s, pts


# --- regions ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(lattices())
def test_lattice_points(case):
    x, region = case
    s, pts = common_checks(x, region)
    pos = np.concatenate(region.values)
    k = (pts[:, pos] - x[pos]) / region.step
    assert np.allclose(k, np.round(k), rtol=0, atol=1e-9)  # multiples of the step
    assert np.array_equal(np.round(k).astype(np.int64), s)


@settings(max_examples=150, deadline=None)
@given(feature_regions())
def test_feature_points(case):
    x, region = case
    s, pts = common_checks(x, region)
    for g, idx in enumerate(region.values):
        v = x[idx]
        move = np.where(v > 0.5, np.maximum(v - region.step, 0.0), np.minimum(v + region.step, 1.0))
        on = s[:, g] == 1
        assert np.allclose(pts[on][:, idx], move, rtol=0, atol=1e-12)  # the clipped move
        assert np.all(pts[~on][:, idx] == v)


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(lattices(), feature_regions()),
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.booleans(),
)
def test_runtime_inputs_are_the_points_bit_for_bit(case, seed, overlap, shared):
    """`points.region_inputs` (only the values a point's generators move) equals the matrix
    product `x + s D` cast to float32, bit for bit, at any coefficients of the box; also where
    a value is moved by several generators (directions made to overlap), and on batches of
    more than `INPUT_ROWS` points that share most generators' values (as a sieve's do: those
    values are computed once a chunk)."""
    from dataclasses import replace

    from verifier.engine.points import INPUT_ROWS, SHARED_FROM, region_inputs

    x, region = case
    if overlap and region.num_generators > 1:
        d = region.directions.copy()
        d[0] += 0.5 * d[1]
        region = replace(region, directions=d)
    rng = np.random.default_rng(seed)
    s = rng.integers(region.lo, region.hi + 1, size=(7, region.num_generators))
    s[0] = 0
    if shared:  # rows 0 and INPUT_ROWS + 1 lead chunks of at least SHARED_FROM
        n = INPUT_ROWS + SHARED_FROM + 2
        s = rng.integers(region.lo, region.hi + 1, size=(n, region.num_generators))
        fixed = rng.random(region.num_generators) < 0.7
        s[:, fixed] = s[0, fixed]
    want = (region.x + s.astype(np.float64) @ region.directions).astype(np.float32)
    assert np.array_equal(region_inputs(region, s).view(np.int32), want.view(np.int32))


def test_points_run_in_parts_answer_as_in_one_call(monkeypatch):
    """`points.predict_points` runs a batch `PREDICT_BYTES` of inputs at a time: the logits of
    every point are those of one call on all of them, in order."""
    from verifier.engine import points
    from verifier.engine.regions import feature_region

    x = np.random.default_rng(0).random(40)
    region = feature_region(x, np.array_split(np.arange(40), 8), 0.25, 3.0)
    s = np.array(list(itertools.product((0, 1), repeat=8)))
    calls = []

    class Runtime:  # a row's sum and first value, per call
        def predict(self, inputs):
            calls.append(len(inputs))
            return np.stack([inputs.sum(axis=1), inputs[:, 0]], axis=1)

    whole = Runtime().predict(points.region_inputs(region, s))
    monkeypatch.setattr(points, "PREDICT_BYTES", 4 * 40 * 100)  # 100 points a part
    calls.clear()
    assert np.array_equal(points.predict_points(Runtime(), region, s), whole)
    assert calls == [100, 100, 56]


@settings(max_examples=60, deadline=None)
@given(lattices(max_dims=3, max_units=8, values=grid_pixel))
def test_lattice_is_the_brute_forced_definition(case):
    """SPEC 3: each selected value moves by an integer multiple of the step, stays in [0,1],
    and the L1 distance is at most the radius. Brute force over every multiple in range, in
    exact comparisons (image values: the regions' rounding slack never decides)."""
    x, region = case
    pos = np.concatenate(region.values)
    if len(pos) > 2 and region.step < 1 / 8:  # keep the brute force small
        return
    span = int(np.ceil(1 / region.step)) + 1
    want = set()
    for ks in itertools.product(range(-span, span + 1), repeat=len(pos)):
        xp = x[pos] + np.array(ks) * region.step
        inside = np.all(xp >= 0) and np.all(xp <= 1)
        if inside and np.abs(np.array(ks)).sum() * region.step <= region.budget:
            want.add(ks)
    assert {tuple(r) for r in all_points(region).tolist()} == want


# --- bounds -------------------------------------------------------------------------------------


def random_chain(rng: np.random.Generator, n: int) -> list:
    """1-3 hidden ReLU layers (maybe a max pool), 2-5 classes, weights of varied scale."""
    chain, width = [], n
    for _ in range(int(rng.integers(1, 4))):
        h = int(rng.integers(2, 14))
        scale = float(rng.choice([0.3, 1.0, 3.0]))
        chain += [
            Affine(rng.normal(size=(h, width)) * scale / np.sqrt(width), rng.normal(size=h)),
            Relu(),
        ]
        width = h
    if rng.random() < 0.3 and width >= 2:
        windows = np.arange(width - width % 2).reshape(-1, 2)
        chain.append(MaxPool(windows.astype(np.int64)))
        width = len(windows)
    k = int(rng.integers(2, 6))
    chain.append(Affine(rng.normal(size=(k, width)) / np.sqrt(width), rng.normal(size=k)))
    return chain


def region_points(region: Region, rng: np.random.Generator, lo, hi, count: int) -> np.ndarray:
    """Points of the sub-box [lo, hi] within budget: all of them when few, else random ones."""
    parts = list(region.enumerate(batch=4096, lo=lo, hi=hi)) if region.size() <= 4000 else []
    if parts:
        return np.concatenate(parts)
    s = rng.integers(lo, hi + 1, size=(count * 4, len(lo)))
    s = s[region.contains(s)]
    return np.concatenate([s, np.clip(np.zeros((1, len(lo)), np.int64), lo, hi)])[: count + 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["lattice", "features"]), st.sampled_from(STEPS))
def test_bounds_never_exceed_the_true_margin(seed, family, step):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    chain = random_chain(rng, n)
    x = rng.random(n)
    if family == "lattice":
        pos = rng.choice(n, int(rng.integers(1, min(n, 5) + 1)), replace=False)
        region = lattice_region(x, pos, step, step * float(rng.uniform(0.5, 10)))
    else:
        feats = np.array_split(rng.permutation(n), int(rng.integers(1, n + 1)))
        region = feature_region(x, feats, step, float(rng.uniform(0.05, 3)))
    label = int(rng.integers(0, forward_lowered(chain, x[None]).shape[1]))
    a, b = rng.integers(region.lo, region.hi + 1), rng.integers(region.lo, region.hi + 1)
    for lo, hi in [(region.lo, region.hi), (np.minimum(a, b), np.maximum(a, b))]:
        s = region_points(region, rng, lo, hi, 200)
        s = s[region.contains(s) & np.all((s >= lo) & (s <= hi), axis=1)]
        for float32 in (True, False):
            spec = spec_chain(chain, region, label, float32=float32)
            found = [interval_bounds(spec, lo, hi), linear_bounds(spec, lo, hi)]
            found.append(linear_bounds(spec, lo, hi, alpha_steps=5))
            if not len(s):
                assert all(bd.empty for bd in found)
                continue
            xs = region.points(s)
            if float32:  # the runtime's float32 evaluation
                xs = xs.astype(np.float32)
                logits = forward_f32(chain, xs)
            else:
                logits = forward_lowered(chain, xs)
            real = (logits[:, [label]] - logits[:, spec.others]).min(axis=0)
            for bd in found:
                assert np.all(bd.lower <= real + 1e-9), (bd.method, bd.lower - real)


def forward_f32(chain: list, x: np.ndarray) -> np.ndarray:
    """The chain evaluated in float32, layer by layer, as a float32 runtime would."""
    a = np.asarray(x, np.float32)
    for layer in chain:
        if isinstance(layer, Affine):
            a = a @ layer.weight.T.astype(np.float32) + layer.bias.astype(np.float32)
        elif isinstance(layer, Relu):
            a = np.maximum(a, np.float32(0))
        else:
            padded = np.concatenate([a, np.full((len(a), 1), -np.inf, np.float32)], axis=1)
            a = padded[:, layer.windows].max(axis=2)
    return a.astype(np.float64)


# --- aggregation --------------------------------------------------------------------------------

LABELS = st.integers(0, 5)
MODELS = ["q1", "q2"]


@st.composite
def outcome(draw, float_side: bool) -> Outcome:
    status = draw(st.sampled_from([CERTIFIED, REFUTED, UNKNOWN, NOT_REFUTED]))
    refuted = status == REFUTED
    transfer = None if float_side else draw(st.none() | st.booleans())
    replayed = draw(st.integers(0, 4))
    return Outcome(
        status,
        "attack",
        coeffs=[1, 0] if refuted else None,
        adv_label=draw(LABELS) if refuted else None,
        transfer=transfer,
        transfer_label=None if transfer is None else draw(LABELS),
        ip_replayed=replayed,
        ip_misclassified=draw(st.integers(0, replayed)),
        ep_replayed=replayed,
        ep_transferred=draw(st.integers(0, replayed)),
    )


@st.composite
def records(draw) -> list[InputRecord]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        label, pred = draw(LABELS), draw(LABELS)
        out.append(
            InputRecord(
                i * 3 + 1,
                label,
                pred,
                draw(st.none() | outcome(True)),
                draw(st.dictionaries(st.sampled_from(MODELS), outcome(False), max_size=2)),
                draw(st.dictionaries(st.sampled_from(MODELS), LABELS, max_size=2)),
            )
        )
    return out


def pct(num: int, den: int):
    return None if den == 0 else 100.0 * num / den


@settings(max_examples=50, deadline=None)
@given(records(), st.randoms(use_true_random=False))
def test_aggregation_adds_up(recs, rnd: random.Random):
    agg = aggregate(recs, models=MODELS).to_dict()
    shuffled = list(recs)
    rnd.shuffle(shuffled)
    assert aggregate(shuffled, models=MODELS).to_dict() == agg  # resume order is moot
    fl = agg["float"]
    o = fl["overall"]
    for key in ("inputs", "l_cc", "l_ic", "r", "r_not", "unknown"):
        assert sum(v[key] for v in fl["per_label"].values()) == o[key]
    assert o["inputs"] == len(recs) and o["l_cc"] + o["l_ic"] == o["inputs"]
    assert o["r"] + o["r_not"] + o["unknown"] == o["l_cc"]
    assert (o["r"], o["r_not"], o["l_cc"]) == tuple(
        len(fl["sets"][k]) for k in ("R", "R_NOT", "L_cc")
    )
    assert o["accuracy"] == pct(o["l_cc"], o["inputs"]) and o["robust"] == pct(o["r"], o["l_cc"])
    assert sum(map(sum, fl["matrix"]["counts"])) <= o["r_not"]
    for name, m in agg["quantized"].items():
        q = m["overall"]
        ints = [k for k, v in q.items() if isinstance(v, int) and not isinstance(v, bool)]
        for key in ints:
            assert sum(v[key] for v in m["per_label"].values()) == q[key], key
        assert q["r"] == o["r"] and q["r_not"] == o["r_not"]
        assert q["rq_fp"] + q["r_fp"] + q["r_unknown"] == q["r"]
        assert q["r_q"] + q["r0"] + q["r_not_unknown"] == q["r_not"]
        assert q["relative_robustness"] == pct(q["rq_fp"], q["r"])
        assert q["adversarial_transfer"] == pct(q["r0"], q["r_not"])
        assert q["ep_transfer"] == pct(q["ep_transferred"], q["ep_replayed"])
        by = {r.index: r.quantized.get(name) for r in recs}
        pairs = sum(by[i].adv_label is not None for i in m["sets"]["R^FP"])
        pairs += sum(by[i].transfer_label is not None for i in m["sets"]["R^0"])
        assert sum(map(sum, m["matrix"]["counts"])) == pairs
