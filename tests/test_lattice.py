"""Requantized outputs are lattice points: the runtime's hidden outputs lie on the lattice the
spec reads from the file, within the bounds cut to it; those bounds stay below the runtime's
margins on every point of small regions, tighten them and turn neurons into constants; the
audit re-derives proofs that need them; a lattice half a step off is caught."""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from onnx_builders import cnn_nchw, cnn_nhwc, mlp

from quantize.error_model import error_model
from quantize.modes import quantize_model
from verifier.engine.bounds import linear_bounds, pointwise_lower, prepare_chain, snap
from verifier.engine.decide import decide
from verifier.engine.diffdecide import decide_from_float
from verifier.engine.model import load_model
from verifier.engine.network import Relu
from verifier.engine.proof import decode, from_text
from verifier.engine.quantized_spec import output_lattice, quantized_spec
from verifier.engine.regions import lattice_region
from verifier.engine.result import CERTIFIED
from verifier.run.proofcheck import CHECKED, Problem, check_tree

GRAPHS = {
    "cnn-nchw": cnn_nchw,
    "cnn-nhwc": cnn_nhwc,
    "mlp": lambda p: mlp(p, sizes=(16, 40, 20, 4), seed=5, gemm=False),
}
CASES = [
    ("mlp", "int8", {}),
    ("cnn-nchw", "int8", {}),
    ("cnn-nhwc", "int8", {}),
    ("cnn-nchw", "ort-qdq", {}),
    ("cnn-nchw", "ort-qdq", {"per_channel": True}),
    ("mlp", "ort-qoperator", {}),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per case: the float model, the quantized runner, its error model and a few inputs."""
    d = tmp_path_factory.mktemp("lattice")
    out = {}
    for name, build in GRAPHS.items():
        model = load_model(build(d / f"{name}.onnx"))
        rng = np.random.default_rng(1)
        calib = rng.random((64, *model.input_shape), dtype=np.float32)
        xs = rng.random((12, *model.input_shape), dtype=np.float32)
        for graph, mode, opts in CASES:
            if graph == name:
                where = d / f"{graph}-{mode}-{len(opts)}"
                runner = quantize_model(model, mode, where, calib, **opts)
                em = error_model(runner, model.network.lower())
                out[graph, mode, len(opts)] = (model, runner, em, xs)
    return out


def _regions(xs: np.ndarray):
    """Per input, a lattice region of three of its first 20 values (a corner of a CNN's
    image: far neurons do not move), with the input."""
    for i, x in enumerate(xs):
        pos = np.random.default_rng(i).choice(min(x.size, 20), 3, replace=False)
        yield x, lattice_region(x.reshape(-1), pos, 0.125, 0.75)


def _boxes(region):
    """The region's box and each box with one generator fixed to one of its values."""
    yield region.lo, region.hi
    for g in range(len(region.lo)):
        for v in range(int(region.lo[g]), int(region.hi[g]) + 1):
            lo, hi = region.lo.copy(), region.hi.copy()
            lo[g] = hi[g] = v
            yield lo, hi


def _check_boxes(runner, spec, region, label) -> dict:
    """Bounds with the spec's lattice, without it, and with it moved half a step, on each
    box against the runtime's smallest margins over the box's points (and the pointwise
    linear bounds against each point's margins)."""
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts).astype(np.float32).reshape(len(pts), *runner.input_shape)
    out = np.asarray(runner.predict(xs), np.float64)
    margins = out[:, [label]] - out[:, spec.others]
    plain = replace(spec, lattice=None)
    off = [None if v is None else (v[0], v[1] + v[0] / 2) for v in spec.lattice]
    wrong = replace(spec, lattice=off)
    got = {"boxes": 0, "above": 0, "wrong_above": 0, "fixed": 0, "tighter": 0.0}
    for lo, hi in _boxes(region):
        inside = np.all((pts >= lo) & (pts <= hi), axis=1)
        least = margins[inside].min(axis=0)
        b = linear_bounds(spec, lo, hi)
        got["boxes"] += 1
        got["above"] += int(np.any(b.lower > least))
        # the linear bounds hold point by point too (what the sieve runs points by)
        got["above"] += int(np.any(pointwise_lower(b, pts[inside]) > margins[inside] + 1e-9))
        got["wrong_above"] += int(np.any(linear_bounds(wrong, lo, hi).lower > least))
        pre = [p for p, layer in zip(b.pre, spec.layers, strict=True) if isinstance(layer, Relu)]
        got["fixed"] += sum(int(np.sum(lo_ == hi_)) for lo_, hi_ in pre)
        gain = float(np.max(b.lower - linear_bounds(plain, lo, hi).lower))
        got["tighter"] = max(got["tighter"], gain)
    return got


@pytest.mark.parametrize(("graph", "mode", "opts"), CASES)
def test_lattice_bounds_hold_on_every_point(built, graph, mode, opts):
    """On every box of small regions the bounds with the lattice stay below the runtime's
    smallest margin over the box, neurons become constants, and some bound rises."""
    model, runner, em, xs = built[graph, mode, len(opts)]
    assert output_lattice(em) is not None
    total = {"boxes": 0, "above": 0, "fixed": 0, "tighter": 0.0}
    for x, region in _regions(xs[:4]):
        label = int(runner.predict(x[None]).argmax())
        spec = quantized_spec(em, region, label).spec
        assert spec.lattice is not None
        got = _check_boxes(runner, spec, region, label)
        for k in ("boxes", "above", "fixed"):
            total[k] += got[k]
        total["tighter"] = max(total["tighter"], got["tighter"])
    assert total["boxes"] > 50 and total["above"] == 0
    assert total["fixed"] > 0 and total["tighter"] > 1e-3


def test_a_lattice_half_a_step_off_is_caught(built):
    """The same check with every lattice moved by half a step: some bound rises above the
    runtime's margin on some box (the check can fail)."""
    model, runner, em, xs = built["cnn-nhwc", "int8", 0]
    caught = 0
    for x, region in _regions(xs):
        label = int(runner.predict(x[None]).argmax())
        spec = quantized_spec(em, region, label).spec
        caught += _check_boxes(runner, spec, region, label)["wrong_above"]
    assert caught > 0


def test_snap_keeps_lattice_points_only():
    """Bounds move inward to the lattice points they hold; one point left gives lo == hi;
    bounds holding none, and layers without a lattice, are left as they are."""
    spec = SimpleNamespace(lattice=[(0.5, -1.0), None])  # what `snap` reads
    lo = np.array([-0.9, 0.1, 0.2, 1.0 - 1e-9, -np.inf])
    hi = np.array([0.4, 0.6, 0.3, 1.4, 0.7])
    a, b = snap(spec, 0, lo, hi)
    assert np.allclose(a[:4], [-0.5, 0.5, 0.2, 1.0]) and np.allclose(b[:4], [0.0, 0.5, 0.3, 1.0])
    assert a[1] == b[1] and a[3] == b[3] and a[4] == -np.inf and b[4] == 0.5
    same = snap(spec, 1, lo, hi)
    assert same[0] is lo and same[1] is hi


def test_proofs_that_need_the_lattice_recheck(built):
    """Quantized decisions on the CNN's int8 copy from the float proofs: certified ones keep
    proofs the audit re-checks on the spec it rebuilds, and some of those fail without the
    lattice (their leaves close only with it)."""
    model, runner, em, xs = built["cnn-nhwc", "int8", 0]
    chain = prepare_chain(model.network.lower())
    rechecked = needed = 0
    for x, region in _regions(xs):
        label = int(runner.predict(x[None]).argmax())
        fd = decide(model, chain, region, label, timeout=20, enum_limit=0, keep_leaves=True)
        if fd.status != CERTIFIED:
            continue
        reuse = fd.detail["reuse"]
        d = decide_from_float(runner, chain, region, label, reuse, em, timeout=20, enum_limit=0)
        if d.status != CERTIFIED or "proof" not in d.detail:
            continue
        proof = decode(from_text(d.detail["proof"]))
        spec = quantized_spec(em, region, label).spec
        problem = Problem(region, label, runner, spec, max_points=0)
        assert check_tree(proof, problem).status == CHECKED
        rechecked += 1
        bare = replace(problem, spec=replace(spec, lattice=None))
        needed += check_tree(proof, bare).status != CHECKED
    assert rechecked > 0 and needed > 0


def _hidden_outputs(interp, details, x: np.ndarray) -> list[np.ndarray]:
    """The dequantized int8 tensors of a LiteRT interpreter (all tensors kept) after running
    one float input `x` (quantized first when the file takes integers)."""
    from quantize.litert import quantize_values

    ind = interp.get_input_details()[0]
    q = (
        x[None]
        if ind["dtype"] == np.float32
        else quantize_values(x[None], *ind["quantization"], ind["dtype"])
    )
    interp.set_tensor(ind["index"], q)
    interp.invoke()
    out = []
    for t in details:
        scale, zp = t["quantization"]
        out.append((interp.get_tensor(t["index"]).astype(np.float64).reshape(-1) - zp) * scale)
    return out


def test_hidden_values_lie_on_the_lattice_within_the_bounds(built):
    """The MLP's int8 copy run with every tensor kept: each hidden layer's output (ReLU fused)
    is a point of the lattice the spec reads from the file, within the ReLU of the cut bounds
    of every box holding the point; the lattice moved half a step is not the runtime's."""
    from ai_edge_litert.interpreter import Interpreter

    model, runner, em, xs = built["mlp", "int8", 0]
    with warnings.catch_warnings():  # keeping every tensor is "for debugging": this is one
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(
            model_path=str(runner.describe()["path"]), experimental_preserve_all_tensors=True
        )
    interp.allocate_tensors()
    checked = fixed = 0
    off_lattice = {"right": 0, "wrong": 0}
    for x, region in _regions(xs[:4]):
        label = int(runner.predict(x[None]).argmax())
        spec = quantized_spec(em, region, label).spec
        relus = [k for k, layer in enumerate(spec.layers) if isinstance(layer, Relu)]
        grids = [spec.lattice[k - 1] for k in relus]
        assert all(g is not None for g in grids)
        details = []  # per hidden layer, its output tensor: the file's scale, the layer's size
        for k, (step, _) in zip(relus, grids, strict=True):
            n = len(spec.layers[k - 1].bias)
            found = [
                t
                for t in interp.get_tensor_details()
                if t["dtype"] == np.int8
                and t["shape"].tolist() == [1, n]
                and np.float32(t["quantization"][0]) == np.float32(step)
            ]
            assert found
            details.append(found[0])
        pts = np.concatenate(list(region.enumerate()))
        values = [
            _hidden_outputs(interp, details, p) for p in region.points(pts).astype(np.float32)
        ]
        for lo, hi in _boxes(region):
            b = linear_bounds(spec, lo, hi)
            inside = np.flatnonzero(np.all((pts >= lo) & (pts <= hi), axis=1))
            for j, k in enumerate(relus):
                low, high = b.pre[k]
                fixed += int(np.sum(low == high))
                for i in inside[:50]:
                    v = values[i][j]
                    assert np.all(v >= np.maximum(low, 0.0) - 1e-9), (k, lo, hi)
                    assert np.all(v <= np.maximum(high, 0.0) + 1e-9), (k, lo, hi)
                    checked += 1
        for i in range(min(len(pts), 50)):
            for j, (step, origin) in enumerate(grids):
                for name, o in (("right", origin), ("wrong", origin + step / 2)):
                    k = (values[i][j] - o) / step
                    off_lattice[name] += int(np.any(np.abs(k - np.round(k)) > 1e-6))
    assert checked > 1000 and fixed > 0
    assert off_lattice["right"] == 0 and off_lattice["wrong"] > 0
