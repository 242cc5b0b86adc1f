"""ONNX Runtime's u8 x s8 kernels on this CPU: whether int16 pair sums saturate (read from the
CPU's flags, checked against the kernel) and which inputs they pair (2m, 2m+1 of a MatMul's
K), and the error model's bound of that loss, pointwise on the real runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import pair_last_mlp, pair_mlp

from quantize.cpu import int16_pair_sums
from quantize.error_model import ErrorModel, error_model
from quantize.modes import quantize_model
from verifier.engine.bounds import point_interval, rounding_errors
from verifier.engine.model import load_model
from verifier.engine.regions import lattice_region


def _matmul_integer(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """ONNX Runtime's MatMulInteger of u8 rows `a` and s8 weights `w` (K, N)."""
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    k, n = w.shape
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w.astype(np.int8), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a.astype(np.uint8)})[0]


def test_cpu_flags_match_the_kernel():
    """Like-signed pairs of 255 x 127 saturate exactly when the flags say so; pairs are
    (2m, 2m+1): alternating signs never saturate, pairs two apart do."""
    cols = np.array([[127, 127, -127, -127] * 4, [127, -127] * 8, [127, -127, -127, 127] * 4]).T
    got = _matmul_integer(cols, np.full((1, 16), 255))[0]
    exact = np.full(16, 255) @ cols
    assert bool(got[0] != exact[0]) == int16_pair_sums()
    assert got[0] == (-4 if int16_pair_sums() else 0)  # + pairs at 32767, - pairs at -32768
    assert got[1] == exact[1] and got[2] == exact[2]


def test_adjacent_pair_bound_holds_pointwise(tmp_path):
    """A QDQ MLP whose first layer saturates its pair sums near x = 1: the runtime's logits lie
    within the model's bounds at every point; without the pair term they do not (when this CPU
    saturates); the alternating column is charged nothing (were pairs two apart, its logits
    would leave the bounds)."""
    model = load_model(pair_mlp(tmp_path / "pair.onnx"))
    calib = np.random.default_rng(0).uniform(0.0, 1.0, (64, 8)).astype(np.float32)
    runner = quantize_model(model, "ort-qdq", tmp_path, calib)
    em = error_model(runner, model.network.lower())
    first = em.rounding[0]
    region = lattice_region(np.full(8, 0.98), np.arange(4), 1 / 64, 1 / 32)
    errors = rounding_errors(em.chain, region, rounding=em.rounding)
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts).astype(np.float32)
    got = runner.predict(xs).astype(np.float64)

    def misses(m: ErrorModel) -> int:
        errs = rounding_errors(m.chain, region, rounding=m.rounding)
        bad = 0
        for g, x in zip(got, xs, strict=True):
            lo, hi = point_interval(m.chain, errs, x.astype(np.float64))
            bad += int(np.any((g < lo) | (g > hi)))
        return bad

    assert misses(em) == 0
    if not int16_pair_sums():
        assert first.pairs is None
        return
    assert first.pairs is not None and first.pairs.adjacent
    bare = replace(first, pairs=None)
    no_pairs = ErrorModel(em.chain, [bare, *em.rounding[1:]], "no pair sums")
    assert misses(no_pairs) > 0
    free = rounding_errors(em.chain, region, rounding=no_pairs.rounding)[0][0]
    assert errors[0][0][1] == free[1] and errors[0][0][0] > free[0]


def test_pair_weights_keep_every_pair_that_can_saturate():
    """The pairs `dynamic_input.pair_weights` keeps (like-signed, |q1| + |q2| > 128: 255 x 128
    < 32767) give the same loss range (`pair_loss_range`) as every pair of the kernel's K
    order: odd K padded with a 0, one order for all rows, one per row, or none; a pair of 64 and
    65 at 255 saturates and is kept, one of 64 and 64 cannot and is left out."""
    from types import SimpleNamespace

    from quantize.rounding import PairSums, Rounding
    from verifier.engine.bounds import in_kernel_order
    from verifier.engine.dynamic_input import INT16, pair_loss_range, pair_weights
    from verifier.engine.network import Affine

    rng = np.random.default_rng(1)
    rows, k = 40, 7
    q = rng.integers(-127, 128, (rows, k)).astype(np.float64)
    q[:3] = 0.0
    q[:3, :2] = [[64, 65], [64, 64], [-64, -65]]
    unit = rng.uniform(0.001, 0.01, rows)
    per_row = np.array([rng.permutation(k) for _ in range(rows)])
    per_row[:3] = np.arange(k)
    for order in (per_row, np.arange(k)[::-1].copy(), None):
        pairs = PairSums(unit, 1.0, 0.0, None, adjacent=True, order=order)
        model = SimpleNamespace(
            rounding=[Rounding(dynamic_input=True, pairs=pairs)],
            chain=SimpleNamespace(layers=[Affine(q * unit[:, None], np.zeros(rows))]),
        )
        w = pair_weights(model)
        assert w is not None and 0 < len(w.row) < rows * 4
        for a_lo, a_hi in [(np.full(k, 255.0), np.full(k, 255.0))] + [
            np.sort(rng.integers(0, 256, (2, k)), axis=0).astype(np.float64) for _ in range(20)
        ]:
            ends = q * a_lo, q * a_hi
            s_min, s_max = in_kernel_order(order, np.minimum(*ends), np.maximum(*ends))
            want = []
            for s in (s_min, s_max):
                pair = s[:, 0::2] + s[:, 1::2]
                want.append((pair - np.clip(pair, *INT16)).sum(axis=1))
            got = pair_loss_range(w, a_lo, a_hi)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        if order is not None and order.ndim == 2:
            assert 0 in w.row and 2 in w.row and 1 not in w.row
            top = pair_loss_range(w, np.full(k, 255.0), np.full(k, 255.0))[1]
            assert list(top[:3]) == [129 * 255 - 32767, 0, -(129 * 255 - 32768)]


def _dynamic_pair_model(tmp_path):
    """`pair_mlp` quantized by ONNX Runtime's dynamic mode (its first layer quantizes its input
    per run) and inputs near 1 on the 1/255 grid, the first one at 1."""
    model = load_model(pair_mlp(tmp_path / "pair.onnx"))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, model.network.lower())
    x = np.array([255, 250, 248, 252, 246, 250, 243, 249]) / 255.0
    return model, runner, em, x


def _first_layer_shift(em, qs) -> np.ndarray:
    """How far the quantized spec's chain moves the first layer's outputs at its region's x
    from the error model's (the loss its saturation folds in)."""
    a, b, x = em.chain.layers[0], qs.chain.layers[0], qs.region.x
    return (a.weight @ x + a.bias) - (b.weight @ x + b.bias)


def _check_shift_needed(runner, em, qs, region, narrow: float) -> None:
    """Column 0 saturates: the spec's first-layer bound is under `narrow` of the region-wide
    one with its middle shifted into the bias, and without that shift (the narrow bound alone)
    runtime points fall outside the spec's interval."""
    from verifier.engine.quantized_spec import QuantizedSpec

    wide = rounding_errors(em.chain, region, rounding=em.rounding)[0][0]
    shift = _first_layer_shift(em, qs)
    assert shift[0] > 0.1 and qs.errors[0][0][0] < narrow * wide[0]
    unshifted = QuantizedSpec(qs.spec, qs.errors, qs.region, em.chain)
    pts = np.concatenate(list(region.enumerate()))
    got = runner.predict(region.points(pts).astype(np.float32)).astype(np.float64)
    outside = 0
    for s, g in zip(pts, got, strict=True):
        lo, hi = unshifted.interval(s)
        outside += int(np.any((g < lo) | (g > hi)))
    assert outside > 0


def test_first_layer_saturation_folded_where_the_scale_is_fixed(tmp_path):
    """A region that leaves the top value alone: the quantized spec folds the input scale and,
    with it, the first layer's pair-sum saturation into its bias (a bound far narrower than the
    region-wide one); the runtime's logits lie within its interval at every point. Without the
    bias shift (the narrow bound alone) they do not."""
    from test_dynamic_input import check_spec_holds

    from verifier.engine.quantized_spec import quantized_spec

    model, runner, em, x = _dynamic_pair_model(tmp_path)
    assert em.rounding[0].dynamic_input and not em.rounding[0].inputs
    region = lattice_region(x, np.arange(1, 6), 1 / 255, 3 / 255)
    label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
    qs = quantized_spec(em, region, label)
    assert qs.region is not region  # the input scale is fixed: folded
    check_spec_holds(runner, qs, region, label)
    if not int16_pair_sums():
        assert em.rounding[0].pairs is None
        return
    _check_shift_needed(runner, em, qs, region, 0.1)


def test_first_layer_saturation_folded_over_the_scale_range(tmp_path):
    """A lattice whose top value moves (the value at 1 moves down, one near it up): the input
    scale varies, so the input rounding is not folded, but the first layer's pair-sum
    saturation is, over the scale's range (a bound far narrower than the region-wide one,
    its middle in the bias); the runtime's logits lie within the spec's interval at every
    point, and on a lattice that halves the top value. The narrow bound without its bias shift
    misses them. The region-wide bound leaves
    the margin open where the folded one certifies: the decision agrees with enumeration and
    its proof re-checks on the spec the audit rebuilds."""
    from test_diffbounds import float_then_quantized
    from test_dynamic_input import check_spec_holds
    from test_engine import check_decision

    from verifier.engine.bounds import linear_bounds, prepare_chain, spec_chain
    from verifier.engine.proof import decode, from_text
    from verifier.engine.quantized_spec import quantized_spec
    from verifier.engine.result import CERTIFIED
    from verifier.run.proofcheck import CHECKED, Problem, check_tree

    model, runner, em, x = _dynamic_pair_model(tmp_path)
    region = lattice_region(x, np.array([0, 1, 3, 5]), 1 / 255, 6 / 255)
    tops = region.points(np.concatenate(list(region.enumerate()))).max(axis=1)
    assert len(np.unique(tops)) > 3  # the row's maximum takes several values
    label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
    qs = quantized_spec(em, region, label)
    assert qs.region is region  # the scale varies: the input rounding is not folded
    check_spec_holds(runner, qs, region, label)
    if not int16_pair_sums():
        assert em.rounding[0].pairs is None
        return
    _check_shift_needed(runner, em, qs, region, 0.2)
    # the region-wide bound leaves the margin open; the folded one certifies, the decision
    # agrees with enumeration, and its proof re-checks on the spec the audit rebuilds
    whole = rounding_errors(em.chain, region, rounding=em.rounding)
    wide_spec = spec_chain(em.chain, region, label, errors=whole)
    assert linear_bounds(wide_spec, region.lo, region.hi).lower.min() < 0
    assert linear_bounds(qs.spec, region.lo, region.hi).lower.min() > 0
    chain = prepare_chain(model.network.lower())
    fd, d = float_then_quantized(model, runner, em, chain, region, label, 4)
    assert fd.status == CERTIFIED
    check_decision(d, runner, region, label)
    assert d.status == CERTIFIED and d.route == "bounds"
    proof = decode(from_text(d.detail["proof"]))
    assert check_tree(proof, Problem(region, label, runner, qs.spec)).status == CHECKED
    # the top value falls to 1/2: the other values' integers double and their pairs, far from
    # saturating at the top's scale, saturate at the lowest: held only with the integers'
    # ranges taken over the whole scale range
    halves = np.array([255, 128, 125, 128, 122, 128, 120, 128]) / 255.0
    falling = lattice_region(halves, np.array([0]), 1 / 16, 0.5)
    label = int(np.argmax(runner.predict(halves[None].astype(np.float32))[0]))
    check_spec_holds(runner, quantized_spec(em, falling, label), falling, label)


def test_first_layer_saturation_folded_in_sub_regions(tmp_path):
    """A region whose top value moves: in every sub-region of fixed scale the folded spec's
    margin bounds lie below the runtime's margins at every point, and its interval holds the
    runtime's logits at the point the guard checks."""
    from verifier.engine.diffdecide import _folded_bounds
    from verifier.engine.quantized_spec import fold_part_of
    from verifier.engine.regions import feature_region

    model, runner, em, x = _dynamic_pair_model(tmp_path)
    region = feature_region(x, [np.array([i]) for i in range(8)], 0.125, 0.25)
    label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
    detail: dict = {}
    folded = _folded_bounds(runner, em, region, label, np.full(1, np.inf), detail, np.inf)
    assert folded is not None, detail
    parts, leaves, _ = folded
    assert len(leaves) == len(parts) > 1, detail  # an infinite threshold closes no part
    others = [k for k in range(2) if k != label]
    for leaf in leaves:
        spec = fold_part_of(parts, leaf.lo, leaf.hi).spec
        assert list(spec.others) == others
        lo, hi = leaf.lo, leaf.hi
        pts = np.array(
            [
                s
                for s in np.concatenate(list(region.enumerate()))
                if np.all(lo <= s) and np.all(s <= hi)
            ]
        )
        got = runner.predict(region.points(pts).astype(np.float32)).astype(np.float64)
        margin = (got[:, [label]] - got[:, others]).min(axis=0)
        assert np.all(leaf.bounds.lower <= margin)


def test_last_layer_saturation_centred(tmp_path):
    """ORT dynamic on a net whose last layer's pair sums saturate (logit 0 loses about half,
    logit 1 gains as much): the quantized spec moves the middle of that loss into the last bias
    and keeps half its width, and the runtime's logits lie within its interval at every point,
    with the first layer's scale fixed (a lattice leaving the top value alone) and in each
    sub-region of fixed scale (one moving it). The narrow bound without its shift, or with the
    shift the other way, leaves them."""
    from test_dynamic_input import check_spec_holds

    from verifier.engine.network import Affine
    from verifier.engine.quantized_spec import (
        QuantizedSpec,
        fold_part_of,
        fold_parts,
        quantized_spec,
    )

    model = load_model(pair_last_mlp(tmp_path / "last.onnx"))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, model.network.lower())
    x = np.array([255, 250, 248, 252, 246, 250, 243, 249]) / 255.0
    if not int16_pair_sums():
        assert em.rounding[-1].pairs is None
        return
    region = lattice_region(x, np.arange(1, 6), 1 / 255, 3 / 255)
    label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
    qs = quantized_spec(em, region, label)
    check_spec_holds(runner, qs, region, label)
    last = em.chain.layers[-1]
    shift = qs.chain.layers[-1].bias - last.bias
    assert shift[0] < -0.5 and shift[1] > 0.5 and abs(shift[2]) < 1e-6
    signs: list = []
    wide = rounding_errors(em.chain, region, rounding=em.rounding, by_sign=signs)[0][-1]
    assert np.all(qs.errors[0][-1][:2] < 0.6 * wide[:2])
    # each sign's charge (`by_sign`, from the same pass) is a run on the last layer twice
    # over, its first copy charged its positive pairs only, its second its negative ones
    r, n = em.rounding[-1], len(last.bias)
    twice = Affine(np.vstack([last.weight] * 2), np.concatenate([last.bias] * 2))
    chain = replace(em.chain, layers=[*em.chain.layers[:-1], twice])
    chain = replace(chain, absw=[*chain.absw[:-1], np.abs(twice.weight)])
    pairs = replace(r.pairs, unit=np.tile(r.pairs.unit, 2), sign=np.repeat([1, -1], n))
    rounding = [*em.rounding[:-1], replace(r, pairs=pairs)]
    both = rounding_errors(chain, region, rounding=rounding)[0][-1]
    assert np.allclose(signs, [both[:n], both[n:]], rtol=1e-12, atol=0.0)
    assert signs[1][0] < wide[0] and signs[0][1] < wide[1]  # one sign's pairs each
    pts = np.concatenate(list(region.enumerate()))
    got = runner.predict(region.points(pts).astype(np.float32)).astype(np.float64)

    def misses(bias: np.ndarray) -> int:
        layers = [*qs.chain.layers[:-1], Affine(last.weight, bias)]
        spec = QuantizedSpec(qs.spec, qs.errors, qs.region, replace(qs.chain, layers=layers))
        return sum(
            int(np.any((g < spec.interval(s)[0]) | (g > spec.interval(s)[1])))
            for s, g in zip(pts, got, strict=True)
        )

    assert misses(last.bias + shift) == 0
    assert misses(last.bias) > 0
    assert misses(last.bias - shift) > 0
    moving = lattice_region(x, np.array([0, 1, 7]), 1 / 255, 2 / 255)
    parts = fold_parts(em, moving, label)
    assert parts is not None and len(parts) > 1
    pts = np.concatenate(list(moving.enumerate()))
    got = runner.predict(moving.points(pts).astype(np.float32)).astype(np.float64)
    for s, g in zip(pts, got, strict=True):
        part = fold_part_of(parts, s, s)
        assert part.chain.layers[-1].bias[0] < last.bias[0] - 0.5
        lo, hi = part.interval(s)
        assert np.all(lo <= g) and np.all(g <= hi)


def _conv_pairs(op: str, c: int, k: int, taps: list) -> np.ndarray:
    """Per output channel of a k x k, `c`-channel u8 x s8 convolution (`op`: QLinearConv or
    ConvInteger) with two taps at +127 (flat in (c, kh, kw)) on an input of 255s: whether its
    first output lost the int16 saturation of a pair."""
    m = len(taps)
    w = np.zeros((m, c * k * k), np.int8)
    for j, (a, b) in enumerate(taps):
        w[j, [a, b]] = 127
    inits = [numpy_helper.from_array(w.reshape(m, c, k, k), "w")]
    if op == "ConvInteger":
        node = helper.make_node(op, ["x", "w"], ["y"])
        out = TensorProto.INT32
    else:
        consts = {"xs": np.float32(1), "xz": np.uint8(0), "ws": np.float32(1)}
        consts.update({"wz": np.int8(0), "ys": np.float32(600), "yz": np.uint8(0)})
        inits += [numpy_helper.from_array(np.array(v), n) for n, v in consts.items()]
        node = helper.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
        out = TensorProto.UINT8
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, k + 2, k + 2])],
        [helper.make_tensor_value_info("y", out, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.full((1, c, k + 2, k + 2), 255, np.uint8)})[0][0, :, 0, 0]
    scale = 1.0 if op == "ConvInteger" else 600.0
    return np.abs(y.astype(np.float64) * scale - 2 * 255 * 127) > 2000


def _window_pairs(c: int, k: int) -> set:
    """The tap pairs (flat in (c, kh, kw)) at K positions 2m, 2m+1 of a window read as
    (kh, kw, c)."""
    order = [ch * k * k + t for t in range(k * k) for ch in range(c)]
    return {tuple(sorted(order[2 * m : 2 * m + 2])) for m in range(c * k * k // 2)}


def test_conv_kernels_pair_windows_as_kh_kw_c():
    """QLinearConv on uint8 pairs K positions 2m, 2m+1 of each window read as (kh, kw, c)
    (when this CPU's kernels saturate at all; odd and even channel counts); ConvInteger
    saturates none. (An int8 input is left to `test_conv_pair_bound_holds_pointwise`, on a
    quantized graph: a lone int8 QLinearConv like this one saturated nothing even at the
    shapes where that graph's does.)"""
    from itertools import combinations

    for c, k in ((1, 3), (2, 3), (3, 2)):
        taps = list(combinations(range(c * k * k), 2))
        hits = _conv_pairs("QLinearConv", c, k, taps)
        got = {t for t, hit in zip(taps, hits, strict=True) if hit}
        assert got == (_window_pairs(c, k) if int16_pair_sums() else set()), (c, k)
        assert not np.any(_conv_pairs("ConvInteger", c, k, taps))


def test_conv_pair_bound_holds_pointwise(tmp_path):
    """A QDQ CNN whose convolution saturates its pair sums near x = 1 (onnxruntime runs it on
    uint8): the runtime's logits lie within the model's bounds and within the quantized spec's,
    whose fold moves the saturating channel's bias by its loss, at every point; without the
    pair term they do not; the channel whose pairs are opposite-signed in (kh, kw, c) order is
    charged nothing (its like-signed (c, kh, kw) pairs would saturate)."""
    from onnx_builders import pair_cnn
    from test_dynamic_input import check_spec_holds

    from verifier.engine.quantized_spec import quantized_spec

    model = load_model(pair_cnn(tmp_path / "pair_cnn.onnx"))
    calib = np.random.default_rng(0).uniform(0.9, 1.0, (64, 2, 4, 4)).astype(np.float32)
    runner = quantize_model(model, "ort-qdq", tmp_path, calib)
    em = error_model(runner, model.network.lower())
    x = np.full(32, 0.98)
    region = lattice_region(x, np.array([0, 5, 21, 30]), 1 / 64, 1 / 32)
    label = int(np.argmax(runner.predict(x.reshape(1, 2, 4, 4).astype(np.float32))[0]))
    qs = quantized_spec(em, region, label)
    check_spec_holds(runner, qs, region, label)
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts)
    got = runner.predict(xs.reshape(-1, 2, 4, 4).astype(np.float32)).astype(np.float64)

    def misses(m: ErrorModel) -> int:
        errs = rounding_errors(m.chain, region, rounding=m.rounding)
        bad = 0
        for g, p in zip(got, xs, strict=True):
            lo, hi = point_interval(m.chain, errs, p)
            bad += int(np.any((g < lo) | (g > hi)))
        return bad

    assert misses(em) == 0
    first = em.rounding[0]
    if not int16_pair_sums():
        assert first.pairs is None
        return
    assert first.pairs.adjacent and first.pairs.order.shape == (8, 18) and first.pairs.unsigned
    shift = _first_layer_shift(em, qs)  # the fold's: channel 0 only
    assert np.all(shift[:4] > 1.0) and np.allclose(shift[4:], 0.0, atol=1e-9)
    # at x = 0.98 channel 0's like-signed pairs saturate at every point: exact, weights 0
    zeroed = (em.chain.layers[0].weight != 0) & (qs.chain.layers[0].weight == 0)
    assert np.all(zeroed[:4].sum(axis=1) >= 2) and not np.any(zeroed[4:])
    charge = rounding_errors(em.chain, region, rounding=em.rounding)[0][0]
    assert np.all(qs.errors[0][0][:4] < 0.5 * charge[:4])
    assert np.all(charge[:4] > 10 * charge[4:])  # channel 0 charged, channel 1 float32 only
    no_pairs = ErrorModel(em.chain, [replace(first, pairs=None), *em.rounding[1:]], "no pairs")
    assert misses(no_pairs) > 0


def test_conv_integer_does_not_saturate_in_a_graph(tmp_path):
    """ONNX Runtime's dynamic quantization of `pair_cnn` (a ConvInteger whose like-signed pairs
    would saturate near x = 1, as the QDQ graph's QLinearConv does): no pair term, and the
    runtime's logits lie within the model's bounds at every point and near the chain's."""
    from onnx_builders import pair_cnn

    from verifier.engine.network import forward_lowered

    model = load_model(pair_cnn(tmp_path / "pair_cnn.onnx"))
    runner = quantize_model(model, "ort-dynamic", tmp_path, None)
    em = error_model(runner, model.network.lower())
    assert em.rounding[0].pairs is None
    x = np.full(32, 0.98)
    region = lattice_region(x, np.array([0, 5, 21, 30]), 1 / 64, 1 / 32)
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts)
    got = runner.predict(xs.reshape(-1, 2, 4, 4).astype(np.float32)).astype(np.float64)
    errs = rounding_errors(em.chain, region, rounding=em.rounding)
    for g, p in zip(got, xs, strict=True):
        lo, hi = point_interval(em.chain, errs, p)
        assert np.all((lo <= g) & (g <= hi))
    exact = forward_lowered(em.chain.layers, xs)
    assert np.max(np.abs(got - exact)) < 0.5  # saturating pairs would lose about half of 17


def test_unfused_groups_run_in_float(tmp_path):
    """onnxruntime's optimizer leaves the example CNN's second QDQ convolution a float Conv
    (read from the graph it runs): that layer has no pair-sum term, the fused ones keep
    theirs, and the runtime's logits lie within the model's bounds at every point of a small
    region."""
    from pathlib import Path

    from test_error_model import _violations

    from quantize.onnx_error_model import run_kernels
    from quantize.ort_runner import optimized_graph

    example = Path(__file__).resolve().parents[1] / "examples" / "mnist_cnn.onnx"
    model = load_model(example)
    rng = np.random.default_rng(3)
    calib = rng.random((32, *model.input_shape), dtype=np.float32)
    runner = quantize_model(model, "ort-qdq", tmp_path, calib)
    ran = optimized_graph(runner.path)
    assert [n.op_type for n in ran.graph.node].count("Conv") == 1
    float_run, unsigned = run_kernels(ran)
    assert len(float_run) == 1 and len(unsigned) == 2  # the second convolution; the others
    em = error_model(runner, model.network.lower())
    pairs = [r.pairs is not None for r in em.rounding if r is not None]
    assert pairs == [int16_pair_sums(), False, int16_pair_sums()]
    fused = "static int8 with int16 pair sums (uint8 kernel)" if int16_pair_sums() else None
    kinds = em.describe()["affine_layers"]
    assert kinds == [fused or "static int8", "static int8", fused or "static int8"]
    x = np.clip(rng.normal(0.8, 0.3, model.input_shape), 0, 1).reshape(-1)
    region = lattice_region(x, np.array([300, 400, 500]), 0.125, 0.75)
    bad, n = _violations(em, runner, region)
    assert bad == 0 and n > 100


def test_fixed_grid_saturation_folded_only_on_uint8_kernels(tmp_path):
    """`pair_cnn`'s convolution saturates near x = 1. onnxruntime runs the QDQ file's on
    uint8 (its int8 activations turned unsigned) and the QOperator file's on int8: the first is
    folded (its bias moved by the loss), the second keeps the two-sided bound; the runtime's
    logits lie within both specs at every point, and a fold forced on the int8 kernel is
    wrong (that kernel does not saturate)."""
    from onnx_builders import pair_cnn
    from test_dynamic_input import check_spec_holds

    from verifier.engine.quantized_spec import quantized_spec

    if not int16_pair_sums():
        return  # no pair sums on this CPU: nothing to fold (test_cpu_flags_match_the_kernel)
    model = load_model(pair_cnn(tmp_path / "pair_cnn.onnx"))
    calib = np.random.default_rng(0).uniform(0.9, 1.0, (64, 2, 4, 4)).astype(np.float32)
    x = np.full(32, 0.98)
    region = lattice_region(x, np.array([0, 5, 21, 30]), 1 / 64, 1 / 32)
    for mode, unsigned in (("ort-qdq", True), ("ort-qoperator", False)):
        runner = quantize_model(model, mode, tmp_path / mode, calib)
        em = error_model(runner, model.network.lower())
        pairs = em.rounding[0].pairs
        assert pairs.unsigned == unsigned and pairs.grid is not None
        label = int(np.argmax(runner.predict(x.reshape(1, 2, 4, 4).astype(np.float32))[0]))
        qs = quantized_spec(em, region, label)
        assert (qs.chain is not em.chain) == unsigned
        check_spec_holds(runner, qs, region, label)
    forced = replace(em.rounding[0], pairs=replace(pairs, unsigned=True))
    wrong = quantized_spec(replace(em, rounding=[forced, *em.rounding[1:]]), region, label)
    with pytest.raises(AssertionError):
        check_spec_holds(runner, wrong, region, label)


def test_example_cnn_qdq_folds_its_first_layer(tmp_path):
    """The example CNN's QDQ file (its first convolution on uint8): on a region of a bright
    image the first layer's saturation is folded (most of its windows do not move: their loss
    is exact), the root bound rises, and the runtime's logits lie within the spec at every
    point."""
    from pathlib import Path

    from test_dynamic_input import check_spec_holds

    from verifier.engine.bounds import linear_bounds
    from verifier.engine.quantized_spec import quantized_spec

    example = Path(__file__).resolve().parents[1] / "examples" / "mnist_cnn.onnx"
    model = load_model(example)
    rng = np.random.default_rng(5)
    runner = quantize_model(
        model, "ort-qdq", tmp_path, rng.random((32, *model.input_shape), dtype=np.float32)
    )
    em = error_model(runner, model.network.lower())
    x = np.clip(rng.normal(0.7, 0.4, model.input_shape), 0, 1).reshape(-1)
    region = lattice_region(x, np.array([300, 330, 400, 430]), 0.125, 0.5)
    label = int(np.argmax(runner.predict(x.reshape(1, *model.input_shape).astype(np.float32))))
    qs = quantized_spec(em, region, label)
    if not int16_pair_sums():
        assert em.rounding[0].pairs is None
        return
    assert qs.chain is not em.chain and em.rounding[0].pairs.unsigned
    bound = check_spec_holds(runner, qs, region, label)
    first = em.rounding[0]
    int8_kernel = replace(first, pairs=replace(first.pairs, unsigned=False))
    unfolded = replace(em, rounding=[int8_kernel, *em.rounding[1:]])
    before = quantized_spec(unfolded, region, label)
    was = linear_bounds(before.spec, before.region.lo, before.region.hi)
    assert np.min(bound.lower) > np.min(was.lower) + 1.0


def test_pair_weights_kept_per_model(tmp_path):
    """The pair-sum kernels' integer weights are worked out once per model
    (`bounds.per_weight`): a spec built from the kept forms equals one built from a fresh copy
    of the model's weights; a kernel with other units on the same weights gets its own; and the
    forms go when the weights do."""
    import gc

    from verifier.engine import bounds
    from verifier.engine.bounds import prepare_chain
    from verifier.engine.network import Affine
    from verifier.engine.quantized_spec import quantized_spec

    model, runner, em, x = _dynamic_pair_model(tmp_path)
    if not int16_pair_sums():
        assert em.rounding[0].pairs is None
        return
    region = lattice_region(x, np.arange(1, 6), 1 / 255, 3 / 255)
    label = int(np.argmax(runner.predict(x[None].astype(np.float32))[0]))
    kept = [quantized_spec(em, region, label) for _ in range(2)]
    w = em.chain.layers[0].weight
    assert [k[1] for k in bounds._PER_WEIGHT if k[0] == id(w)] == ["integers"]  # folded here
    copy = [
        Affine(layer.weight.copy(), layer.bias) if isinstance(layer, Affine) else layer
        for layer in em.chain.layers
    ]
    fresh = quantized_spec(replace(em, chain=prepare_chain(copy)), region, label)
    for qs in (kept[1], fresh):
        for a, b in zip(kept[0].errors[0], qs.errors[0], strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)
        assert np.array_equal(qs.chain.layers[0].bias, kept[0].chain.layers[0].bias)
    r = em.rounding[0]
    half = replace(r, pairs=replace(r.pairs, unit=r.pairs.unit / 2.0))
    one = rounding_errors(em.chain, region, rounding=em.rounding)[0][0]
    other = rounding_errors(em.chain, region, rounding=[half, *em.rounding[1:]])[0][0]
    anew = rounding_errors(prepare_chain(copy), region, rounding=[half, *em.rounding[1:]])
    assert np.array_equal(other, anew[0][0]) and not np.array_equal(one, other)
    kinds = sorted(k[1] for k in bounds._PER_WEIGHT if k[0] == id(w))
    assert kinds == ["integers", "saturable", "saturable"]  # no dense copy of the weights
    gone = {id(layer.weight) for layer in copy if isinstance(layer, Affine)}
    assert any(k[0] in gone for k in bounds._PER_WEIGHT)
    del copy, fresh, qs
    gc.collect()
    assert not any(k[0] in gone for k in bounds._PER_WEIGHT)


def _dense_pair_loss(p, w, lo, hi, big):
    """Every like-signed pair's loss, (A_2m q_2m + A_2m+1 q_2m+1 - 32767)+, summed per row: the
    bound `_pair_saturation` gives with the kernel's inputs at most `big`."""
    from verifier.engine.bounds import PAIR_HALF, in_kernel_order

    gain = np.broadcast_to(np.asarray(p.gain, dtype=np.float64), lo.shape)
    q = np.abs(w) / (p.unit[:, None] * np.abs(gain)[None, :]) * (1.0 + 1e-6)
    sign = np.sign(w) * np.sign(gain)[None, :]
    prod = q * big[None, :]
    if np.any(p.sign):
        prod = np.where(sign == np.reshape(p.sign, (-1, 1)), prod, 0)
    prod, sign = in_kernel_order(p.order, prod, sign)
    like = sign[:, 0::2] * sign[:, 1::2] > 0
    pair = np.where(like, prod[:, 0::2] + prod[:, 1::2] - 2 * PAIR_HALF, 0.0)
    return np.maximum(pair, 0.0).sum(axis=1)


def test_saturable_pairs_alone_give_every_pairs_loss():
    """`_pair_saturation` adds only the pairs that saturate with both inputs at their largest
    (`bounds._saturable_pairs`): its bound equals every like-signed pair's, for a kernel in
    the layer's order, in one order for every row, per row, with one sign's pairs."""
    from quantize.rounding import Grid, PairSums
    from verifier.engine.bounds import _pair_saturation, _saturable_pairs

    rng = np.random.default_rng(7)
    rows, k = 40, 31
    unit = rng.uniform(0.005, 0.02, rows)
    w = rng.integers(-127, 128, (rows, k)) * (rng.random((rows, k)) < 0.7) * unit[:, None]
    grid = Grid(1 / 255, 0.0, 1.0)
    lo = rng.uniform(0.3, 0.8, k)
    hi = np.minimum(lo + rng.uniform(0.0, 0.4, k), 1.0)
    big = np.clip(np.ceil(hi / grid.scale + 0.5), 0.0, 255.0)
    orders = [None, rng.permutation(k), np.argsort(rng.random((rows, k)), axis=1)]
    for order in orders:
        for sign in (0, 1, -1):
            p = PairSums(unit, 1.0, 0.0, grid, adjacent=True, order=order, sign=sign)
            got = _pair_saturation(p, w, np.abs(w), lo, hi)
            want = p.unit * grid.scale * _dense_pair_loss(p, w, lo, hi, big)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0.0)
            assert np.count_nonzero(want) >= 3
    few = len(_saturable_pairs(p, w, np.abs(w), lo.shape)[0])
    assert 0 < few < rows * k // 4  # most like-signed pairs can never saturate
