"""Error models of quantized runtimes: pointwise soundness on the real runtime, decisions that
agree with exhaustive enumeration, the guard against a wrong model, unsupported graphs."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import (
    cnn_hidden_hybrid_nhwc,
    cnn_nchw,
    cnn_nhwc,
    cnn_pool_nhwc,
    mlp,
    two_linear,
)
from test_engine import check_decision, truth

from quantize.error_model import ErrorModel, Grid, Rounding, error_model, error_models
from quantize.modes import float_runner, quantize_model
from verifier.engine.bounds import (
    linear_bounds,
    point_interval,
    prepare_chain,
    rounding_errors,
    spec_chain,
)
from verifier.engine.decide import decide
from verifier.engine.diffdecide import decide_from_float
from verifier.engine.model import load_model
from verifier.engine.network import Affine, Relu
from verifier.engine.pointwise import first_exact_margins
from verifier.engine.regions import lattice_region
from verifier.engine.result import CERTIFIED, REFUTED, UNKNOWN
from verifier.errors import UnsupportedModelError

ROOT = Path(__file__).resolve().parent.parent
MODES = ["dynamic", "dynamic-per-tensor", "int8", "16x8", "float16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16-80-40-4 MLP (two weights quantized by dynamic range, the last left in float), its
    quantized runners per mode, and a few inputs."""
    d = tmp_path_factory.mktemp("em")
    model = load_model(mlp(d / "mlp.onnx", sizes=(16, 80, 40, 4), seed=3))
    rng = np.random.default_rng(0)
    calib = rng.random((128, 16), dtype=np.float32)
    runners = {m: quantize_model(model, m, d, calib) for m in MODES}
    return model, runners, rng.random((6, 16), dtype=np.float32)


def _region(x: np.ndarray, seed: int, step: float = 0.125, radius: float = 0.75):
    """A lattice of 3 values: a few thousand points at most."""
    pos = np.random.default_rng(seed).choice(x.size, 3, replace=False)
    return lattice_region(x, pos, step, radius)


def _violations(model: ErrorModel, runner, region) -> tuple[int, int]:
    """(points whose runtime logits leave the model's interval, points checked)."""
    errors = rounding_errors(model.chain, region, rounding=model.rounding)
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts).astype(np.float32)
    got = runner.predict(xs.reshape(len(xs), *runner.input_shape)).astype(np.float64)
    bad = 0
    for xp, g in zip(xs, got, strict=True):
        lo, hi = point_interval(model.chain, errors, xp.astype(np.float64))
        bad += int(np.any(g < lo) or np.any(g > hi))
    return bad, len(pts)


def _bounds_and_margins(em: ErrorModel, runner, region, errors, x):
    """The error model's spec at x's label, its linear bounds over the region, the region's
    points and the runtime's margins there."""
    label = int(runner.predict(x[None]).argmax())
    spec = spec_chain(em.chain, region, label, errors=errors)
    pts = np.concatenate(list(region.enumerate()))
    out = runner.predict(region.points(pts).astype(np.float32)).astype(np.float64)
    margins = out[:, [label]] - out[:, spec.others]
    return spec, linear_bounds(spec, region.lo, region.hi), pts, margins


@pytest.mark.parametrize("mode", MODES)
def test_pointwise_soundness(tiny, mode):
    """At every point of small regions the runtime's logits lie within the model's bounds, and
    the margin lower bounds over the region are below every runtime margin."""
    model, runners, xs = tiny
    runner = runners[mode]
    em = error_model(runner, model.network.lower())
    kinds = em.describe()["affine_layers"]
    assert ("static int8" in kinds) == (mode in ("int8", "16x8"))
    assert ("dynamic int8 input" in kinds) == mode.startswith("dynamic")
    # integer layers (int8, 16x8, hybrid) are charged their scaling, not a float32 dot product
    integer = [r.integer for r in em.rounding if r is not None]
    hybrid = [r.dynamic_input for r in em.rounding if r is not None]
    if mode in ("int8", "16x8"):
        assert all(integer)
    else:
        assert integer == hybrid
    checked = 0
    for i, x in enumerate(xs):
        region = _region(x, i, *((0.004, 0.02) if mode == "int8" else (0.125, 0.75)))
        try:
            errors = rounding_errors(em.chain, region, rounding=em.rounding)
        except ValueError as exc:  # a static grid may saturate: no bound, never a wrong one
            assert "saturate" in str(exc) or "leaves" in str(exc)
            continue
        bad, n = _violations(em, runner, region)
        assert bad == 0 and n > 100
        checked += 1
        spec, b, pts, margins = _bounds_and_margins(em, runner, region, errors, x)
        assert np.all(b.lower <= margins.min(axis=0))
        # the sieve's pointwise bounds, the first layer exact but for its rounding bound
        exact = first_exact_margins(spec, b, np.arange(len(spec.others)), pts)
        assert exact is not None and np.all(exact <= margins)
    assert checked >= 2


@pytest.mark.parametrize("mode", ["int8", "16x8"])
def test_first_exact_margins_charge_the_first_layers_rounding(tmp_path, mode):
    """The sieve's pointwise bounds on a quantized runtime (one hidden layer: only the first
    layer's rounding stands between them and the runtime's margins) stay below its margins at
    every point; with that rounding bound left out some would not (the charge is needed:
    full-integer modes, whose first layer rounds its outputs to the int8 / int16 grid)."""
    import verifier.engine.pointwise as pointwise

    model = load_model(mlp(tmp_path / "one.onnx", sizes=(16, 40, 4), seed=5))
    rng = np.random.default_rng(1)
    runner = quantize_model(model, mode, tmp_path, rng.random((128, 16), dtype=np.float32))
    em = error_model(runner, model.network.lower())
    over = 0
    for i, x in enumerate(rng.random((4, 16), dtype=np.float32)):
        region = _region(x, i, 0.125, 0.75)
        errors = rounding_errors(em.chain, region, rounding=em.rounding)
        spec, b, pts, margins = _bounds_and_margins(em, runner, region, errors, x)
        rows = np.arange(len(spec.others))
        assert np.all(first_exact_margins(spec, b, rows, pts) <= margins)
        bare = replace(spec, err=[None, *spec.err[1:]], first_input=None, in_err=None)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(pointwise, "_first_err", lambda spec: None)
            over += int(np.sum(first_exact_margins(bare, b, rows, pts) > margins + 1e-6))
    assert over > 0


def test_wrong_model_is_caught(tiny):
    """Float weights in place of the file's, no rounding: the pointwise check finds runtime
    logits outside its bounds, and the guard in decide refuses it at some input."""
    model, runners, xs = tiny
    runner = runners["dynamic"]
    chain = prepare_chain(model.network.lower())
    wrong = ErrorModel(chain, [None] * len(chain.layers), "float weights, no rounding")
    assert sum(_violations(wrong, runner, _region(x, i))[0] for i, x in enumerate(xs)) > 0
    refused = 0
    for i, x in enumerate(xs):
        region = _region(x, i)
        label = int(runner.predict(x[None]).argmax())
        d = decide(
            runner,
            chain,
            region,
            label,
            timeout=30,
            enum_limit=0,
            quantized=True,
            error_model=wrong,
        )
        refused += not d.detail["trusted_bounds"]
    assert refused > 0


@pytest.mark.parametrize("mode", MODES)
def test_decide_agrees_with_enumeration(tiny, mode):
    """Regions larger than the enumeration limit: certified only where enumerating the runtime
    finds no misclassified point, refutations confirmed, and bounds used for some."""
    model, runners, xs = tiny
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    statuses, routes = [], []
    for i, x in enumerate(xs):
        for step, radius in ((0.125, 0.75), (0.03125, 0.25)):
            region = _region(x, 10 + i, step, radius)
            label = int(runner.predict(x[None]).argmax())
            assert region.count(10**6) > 64
            d = decide(
                runner,
                chain,
                region,
                label,
                timeout=30,
                enum_limit=64,
                quantized=True,
                error_model=em,
            )
            check_decision(d, runner, region, label)
            if mode != "int8":
                assert d.detail["trusted_bounds"], d.detail.get("untrusted_reason")
            elif not d.detail["trusted_bounds"]:
                assert "saturate" in d.detail["untrusted_reason"]
            statuses.append(d.status)
            routes.append(d.route)
    assert CERTIFIED in statuses
    if mode != "int8":  # this net's int8 grids are tight: its regions mostly may saturate
        certified_by = {r for s, r in zip(statuses, routes, strict=True) if s == CERTIFIED}
        assert {"bounds", "bab"} & certified_by


def test_unsupported_graphs(tmp_path):
    """Int8 rounding between two weighted layers with no activation between them (the float
    chain folds them into one Affine): a reason naming it; decide without a model never
    certifies a region it cannot enumerate."""
    model = load_model(two_linear(tmp_path / "two.onnx"))
    calib = np.random.default_rng(1).random((64, 8), dtype=np.float32)
    runner = quantize_model(model, "int8", tmp_path, calib)
    chain = model.network.lower()
    with pytest.raises(UnsupportedModelError, match="two weighted layers"):
        error_model(runner, chain)
    reasons = error_models({"q": runner, "f": float_runner(model)}, chain)
    assert "two weighted layers" in reasons["q"] and isinstance(reasons["f"], ErrorModel)
    x = np.random.default_rng(0).random(8, dtype=np.float32)
    region = lattice_region(x, np.arange(8), 0.01, 1.0)
    label = int(runner.predict(x[None]).argmax())
    d = decide(runner, chain, region, label, timeout=1, enum_limit=16, quantized=True)
    assert d.status in (UNKNOWN, REFUTED)
    assert d.detail["trusted_bounds"] is False


def _clamped(x: np.ndarray, grid: Grid) -> np.ndarray:
    """What a runtime computes for `test_saturating_grid_is_bounded`'s chain."""
    y = np.clip(np.round(4.0 * x / grid.scale) * grid.scale, grid.lo, grid.hi)
    return np.maximum(y, 0.0) + np.array([1.0, 0.0])


def test_saturating_grid_is_bounded():
    """An output grid the region's values leave: the clamp's move is part of the bound, which
    holds at every point (and is wider than the unsaturated half step)."""
    chain = prepare_chain([Affine(np.eye(2) * 4.0, np.zeros(2)), Relu(), Affine(np.eye(2), [1, 0])])
    tight = Grid(0.01, -1.28, 1.27)
    em = ErrorModel(chain, [Rounding(output_grid=tight, multiplier=0.5), None, Rounding()], "t")
    region = lattice_region(np.array([0.5, 0.5]), np.arange(2), 0.1, 0.5)
    errors = rounding_errors(em.chain, region, rounding=em.rounding)
    assert errors[0][0].max() > 0.5  # the clamp's move, not only half a step
    pts = np.concatenate(list(region.enumerate()))
    xs = region.points(pts)
    for x, y in zip(xs, _clamped(xs, tight), strict=True):
        lo, hi = point_interval(em.chain, errors, x)
        assert np.all(lo <= y) and np.all(y <= hi)
    loose = ErrorModel(chain, [Rounding(), None, Rounding()], "no clamp")
    errs = rounding_errors(loose.chain, region, rounding=loose.rounding)
    out = [point_interval(loose.chain, errs, x) for x in xs]
    y = _clamped(xs, tight)
    assert any(np.any(v < lo) or np.any(v > hi) for v, (lo, hi) in zip(y, out, strict=True))


ORT_CASES = [
    ("ort-qdq", {}),
    ("ort-qdq", {"per_channel": True}),
    ("ort-qdq", {"activation_type": "uint8"}),
    ("ort-qdq", {"reduce_range": True}),
    ("ort-qoperator", {}),
    ("ort-qoperator", {"per_channel": True}),
    ("ort-dynamic", {}),
    ("ort-dynamic", {"per_channel": True}),
    ("ort-dynamic", {"reduce_range": True}),
    ("simulated", {"act_bits": 8}),
    ("simulated", {"weight_bits": 4, "act_bits": 4, "per_channel": True}),
]
GRAPHS = {
    "mlp": lambda p: mlp(p, sizes=(16, 40, 20, 4), seed=5, gemm=False),
    "cnn-nhwc": cnn_nhwc,
    "cnn-nchw": cnn_nchw,
}


@pytest.fixture(scope="module")
def ort_models(tmp_path_factory):
    """The tiny graphs, float, with calibration inputs and a few test inputs each."""
    d = tmp_path_factory.mktemp("ortem")
    rng = np.random.default_rng(1)
    out = {}
    more = {"cnn-pool-nhwc": cnn_pool_nhwc, "cnn-hidden-hybrid": cnn_hidden_hybrid_nhwc}
    for name, build in {**GRAPHS, **more}.items():
        model = load_model(build(d / f"{name}.onnx"))
        calib = rng.random((64, *model.input_shape), dtype=np.float32)
        out[name] = (model, calib, rng.random((3, *model.input_shape), dtype=np.float32), d)
    return out


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize(("mode", "opts"), ORT_CASES)
def test_onnxruntime_pointwise_soundness(ort_models, graph, mode, opts):
    """ONNX Runtime files (static QDQ / QOperator, dynamic, simulated; MLP and CNNs, per tensor
    and per channel): the runtime's logits at every point of small regions lie within the
    error model's bounds, read from the file (its weights differ from the float model's)."""
    model, calib, xs, d = ort_models[graph]
    runner = quantize_model(model, mode, d / graph, calib, **opts)
    em = error_model(runner, model.network.lower())
    assert em.describe()["how"] and em.source.startswith("onnxruntime")
    float_w = [x.weight for x in model.network.lower() if isinstance(x, Affine)]
    file_w = [x.weight for x in em.chain.layers if isinstance(x, Affine)]
    assert any(not np.allclose(a, b) for a, b in zip(float_w, file_w, strict=True))
    for i, x in enumerate(xs):
        region = _region(x.reshape(-1), i)
        bad, n = _violations(em, runner, region)
        assert bad == 0 and n > 100


TFLITE_CNN_MODES = ["dynamic", "dynamic-per-tensor", "int8", "16x8", "float16"]


@pytest.mark.parametrize("graph", ["cnn-nchw", "cnn-pool-nhwc", "cnn-hidden-hybrid"])
@pytest.mark.parametrize("mode", TFLITE_CNN_MODES)
def test_tflite_cnn_pointwise_soundness(ort_models, graph, mode):
    """TFLite CNNs (hybrid, int8 and 16x8 CONV_2D, the first or on a ReLU's output, max pools,
    the converter's layout transposes): the runtime's logits at every point of small regions
    lie within the error model's bounds, and the model reads the file's quantized layers."""
    model, calib, xs, d = ort_models[graph]
    runner = quantize_model(model, mode, d / graph, calib)
    em = error_model(runner, model.network.lower())
    kinds = em.describe()["affine_layers"]
    if graph == "cnn-pool-nhwc":  # weights large enough for every mode to quantize them
        want = {"dynamic": "dynamic int8 input", "int8": "static int8", "16x8": "static int8"}
        assert kinds[0] == want.get(mode.split("-")[0], "float32")
    integer = [r.integer for r in em.rounding if r is not None]
    hybrid = [r.dynamic_input for r in em.rounding if r is not None]
    assert integer == ([True] * len(integer) if mode in ("int8", "16x8") else hybrid)
    for i, x in enumerate(xs[:2]):
        region = _region(x.reshape(-1), i, 0.03125, 0.25)
        bad, n = _violations(em, runner, region)
        assert bad == 0 and n > 100


def _quantized_row(a: np.ndarray, symmetric: bool) -> np.ndarray:
    """Each row of `a` quantized to int8 and back as LiteRT's hybrid kernels do: symmetric
    (max|a| / 127) or asymmetric (255 steps over [min(a, 0), max(a, 0)], nudged zero point)."""
    out = np.empty_like(a)
    for i, v in enumerate(a):
        lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
        if hi == lo:
            out[i] = v
        elif symmetric:
            s = np.abs(v).max() / 127.0
            out[i] = np.clip(np.rint(v / s), -127, 127) * s
        else:
            s = (hi - lo) / 255.0
            zp = np.clip(np.rint(-128 - lo / s), -128, 127)
            out[i] = (np.clip(np.rint(v / s + zp), -128, 127) - zp) * s
    return out


def _simulated(em: ErrorModel, x: np.ndarray, flip: bool) -> np.ndarray:
    """The error model's chain on `x` with each hybrid layer's input quantized per image as its
    Rounding says (`flip`: the other way, symmetric for asymmetric and back)."""
    a = x.reshape(len(x), -1).astype(np.float64)
    for layer, r in zip(em.chain.layers, em.rounding, strict=True):
        if r is not None and r.dynamic_input:
            a = _quantized_row(a, r.symmetric_input != flip)
        a = layer.forward(a)
    return a


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-per-tensor"])
def test_hybrid_conv_input_quantization_is_the_runtimes(tmp_path, mode):
    """A hybrid CONV_2D with per-channel weights quantizes its input (here a ReLU's output) per
    image, asymmetrically: the runtime's logits match the error model's chain run that way to
    float32 accuracy, and miss it by far more run symmetrically (127 steps), which the error
    model charged before (twice the step on non-negative inputs)."""
    model = load_model(cnn_hidden_hybrid_nhwc(tmp_path / "cnn.onnx"))
    rng = np.random.default_rng(4)
    calib = rng.random((64, *model.input_shape), dtype=np.float32)
    runner = quantize_model(model, mode, tmp_path, calib)
    em = error_model(runner, model.network.lower())
    hybrid = [r for r in em.rounding if r is not None and r.dynamic_input]
    assert len(hybrid) == 1 and not hybrid[0].symmetric_input  # the second convolution
    xs = rng.random((32, *model.input_shape), dtype=np.float32)
    got = runner.predict(xs).astype(np.float64)
    own = np.abs(_simulated(em, xs, False) - got).max()
    other = np.abs(_simulated(em, xs, True) - got).max()
    assert own < 1e-4 < other and 50 * own < other


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_hidden_hybrid_cnn_decisions_agree_with_enumeration(ort_models, mode):
    """The MNIST-shaped CNN (a hybrid or int8 CONV_2D on a ReLU's output): quantized decisions
    from the float proof on regions above the enumeration limit certify only where the runtime
    misclassifies no point, refute only at a confirmed point, and the error model certifies
    some through its bounds."""
    model, calib, xs, d = ort_models["cnn-hidden-hybrid"]
    runner = quantize_model(model, mode, d / "cnn-hidden-hybrid", calib)
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    routes = []
    for i, x in enumerate(xs):
        for step, radius in ((0.03125, 0.25), (0.0625, 1.0), (0.125, 2.0)):
            region = _region(x.reshape(-1), 30 + i, step, radius)
            label = int(runner.predict(x[None]).argmax())
            assert region.count(10**6) > 64
            fd = decide(float_runner(model), chain, region, label, timeout=30.0, keep_leaves=True)
            if fd.status != CERTIFIED:
                continue
            q = decide_from_float(
                runner,
                chain,
                region,
                label,
                fd.detail.get("reuse"),
                em,
                timeout=30.0,
                enum_limit=64,
            )
            check_decision(q, runner, region, label)
            routes.append((q.status, q.route))
    bounds_routes = {"bounds", "diff-root", "diff-leaves", "diff-bab"}
    assert any(s == CERTIFIED and r in bounds_routes for s, r in routes), routes


def _no_rounding(chain) -> list:
    return [Rounding() if isinstance(x, Affine) else None for x in chain.layers]


def _wrong_scale(em: ErrorModel, factor: float) -> ErrorModel:
    """`em` with every weight scale off by `factor` (its rounding kept)."""
    layers = [
        Affine(x.weight * factor, x.bias) if isinstance(x, Affine) else x for x in em.chain.layers
    ]
    return ErrorModel(prepare_chain(layers), em.rounding, "wrong weight scale")


WRONG_CASES = [
    ("mlp", "ort-qdq", {}),
    ("cnn-nchw", "ort-qdq", {}),
    ("cnn-nchw", "ort-dynamic", {}),
    ("cnn-nchw", "simulated", {"act_bits": 8}),
    ("cnn-pool-nhwc", "int8", {}),
    ("cnn-pool-nhwc", "dynamic", {}),
]


@pytest.mark.parametrize(("graph", "mode", "opts"), WRONG_CASES)
def test_wrong_models_are_caught(ort_models, graph, mode, opts):
    """ONNX Runtime (QDQ, dynamic, simulated) and TFLite (int8, hybrid) files: float weights
    with no rounding, the file's weights with no rounding, and the file's model with its weight
    scales 20% too small: the pointwise check finds runtime logits
    outside their bounds. (Too large a scale can hide behind the clamps' bounds, which grow
    with the intervals they clamp.)"""
    model, calib, xs, d = ort_models[graph]
    runner = quantize_model(model, mode, d / graph, calib, **opts)
    em = error_model(runner, model.network.lower())
    chain = prepare_chain(model.network.lower())
    wrong = [
        ErrorModel(chain, _no_rounding(chain), "float weights, no rounding"),
        ErrorModel(em.chain, _no_rounding(em.chain), "no rounding"),
        _wrong_scale(em, 0.8),
    ]
    for bad in wrong:
        found = sum(
            _violations(bad, runner, _region(x.reshape(-1), i, 0.03125, 0.25))[0]
            for i, x in enumerate(xs)
        )
        assert found > 0, bad.source


def test_truth_helper_sees_errors(tiny):
    """The enumeration the tests trust finds misclassified points where there are some."""
    _, runners, xs = tiny
    _, bad = truth(runners["dynamic"], _region(xs[0], 0, 0.25, 3.0), 0)
    assert bad.any()


def test_mnist_dynamic_certifies_beyond_enumeration(real_data, tmp_path):
    """examples/mnist_mlp.onnx, TFLite dynamic range, real MNIST: feature regions far larger
    than the enumeration cap are certified on the quantized runtime through its error model."""
    from verifier.engine.data import load_dataset
    from verifier.run.check import Settings, build_region

    model = load_model(ROOT / "examples" / "mnist_mlp.onnx")
    runner = quantize_model(model, "dynamic", tmp_path, None)
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    ds = load_dataset("mnist", data_dir=real_data)
    st = Settings(radius=20, step=0.0625)
    certified = 0
    for i in range(12):
        x, y = ds.images[i].reshape(-1).astype(np.float32), int(ds.labels[i])
        if int(runner.predict(x[None]).argmax()) != y:
            continue
        region = build_region(st, x, chain.layers, y, i)
        assert region.count(10**7) > 10**7
        d = decide(runner, chain, region, y, timeout=3, quantized=True, error_model=em)
        assert d.status != CERTIFIED or d.route in ("bounds", "bab")
        if d.status == REFUTED:
            got = int(runner.predict(region.points(d.coeffs[None]).astype(np.float32)).argmax())
            assert got != y and got == d.adv_label
        certified += d.status == CERTIFIED
        if certified >= 2:
            break
    assert certified >= 2


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_deeper_cuts_on_error_models_hold_and_the_better_root_is_kept(tiny, mode):
    """On an error model's spec the knapsack cuts of the ReLU below the first
    (`SpecChain.deeper_cuts`) give margin bounds below the runtime's margin at every point of
    feature regions (linear and pointwise); `with_deeper_cuts` always takes them for the spec
    and keeps the root bound with them exactly where they raise its worst margin (and the one
    without does not prove every margin); both root choices occur."""
    from verifier.engine.quantized_spec import with_deeper_cuts
    from verifier.engine.regions import feature_region

    model, runners, xs = tiny
    runner = runners[mode]
    em = error_model(runner, model.network.lower())
    rng = np.random.default_rng(5)
    chosen, checked = set(), 0
    for x in xs:
        for radius in (1.0, 2.0, 3.0):
            features = np.array_split(rng.permutation(16), 8)
            region = feature_region(x, features, 0.5, radius)
            try:
                errors = rounding_errors(em.chain, region, rounding=em.rounding)
            except ValueError:  # a static grid may saturate: no bound
                continue
            spec, _, pts, margins = _bounds_and_margins(em, runner, region, errors, x)
            cut = replace(spec, deeper_cuts=True)
            b = linear_bounds(cut, region.lo, region.hi)
            assert np.all(b.lower <= margins.min(axis=0) + 1e-9)
            rows = np.arange(len(spec.others))
            assert np.all(first_exact_margins(cut, b, rows, pts) <= margins + 1e-9)
            off = linear_bounds(spec, region.lo, region.hi)
            got, root = with_deeper_cuts(spec, region)
            assert got.deeper_cuts
            proved = bool(np.all(off.lower > 0))  # then the bounds without are kept
            best = np.min(off.lower) if proved else max(np.min(b.lower), np.min(off.lower))
            assert np.min(root.lower) == best
            chosen.add(not proved and np.min(b.lower) > np.min(off.lower))
            checked += 1
    assert checked >= 6 and chosen == {True, False}


def test_lattice_regions_keep_the_roots_choice_of_deeper_cuts(tiny):
    """On a lattice region `with_deeper_cuts` gives the nodes the deeper cuts only where they
    raise the root's worst margin bound (on a feature region they always get them: the
    test above), and the root bound is the better of both either way (the one without where
    it proves every margin); on these lattices the
    cuts never raise it, so the spec is left without them."""
    from verifier.engine.quantized_spec import with_deeper_cuts

    model, runners, xs = tiny
    seen = []
    for mode, x, radius in itertools.product(("int8", "dynamic"), xs, (0.5, 1.0, 2.0)):
        em = error_model(runners[mode], model.network.lower())
        region = lattice_region(x, np.arange(0, 16, 2), 0.25, radius)
        try:
            errors = rounding_errors(em.chain, region, rounding=em.rounding)
        except ValueError:  # a static grid may saturate: no bound
            continue
        label = int(runners[mode].predict(x[None]).argmax())
        spec = spec_chain(em.chain, region, label, errors=errors)
        off = linear_bounds(spec, region.lo, region.hi)
        on = linear_bounds(replace(spec, deeper_cuts=True), region.lo, region.hi)
        proved = bool(np.all(off.lower > 0))  # the bounds without prove it: kept
        better = not proved and bool(np.min(on.lower) > np.min(off.lower))
        got, root = with_deeper_cuts(spec, region)
        assert got.deeper_cuts == better
        best = np.min(off.lower) if proved else max(np.min(on.lower), np.min(off.lower))
        assert np.min(root.lower) == best
        seen.append(better)
    assert len(seen) >= 6 and not all(seen)


@pytest.mark.parametrize("mode", ["int8", "16x8"])
def test_milp_on_error_model_specs_contains_the_runtime(tiny, mode):
    """The mixed-integer program on a quantized runtime's spec (its input rounding charged,
    `verifier.engine.milp`) contains every point the runtime computes: asked for a margin below
    the runtime's own minimum over a small region (plus 1e-4), it never proves none exists,
    and a point it finds lies in the box; the same program with the rounding dropped (a wrong
    model) proves a false "unsat" on some region."""
    from verifier.engine.milp import milp_decide
    from verifier.engine.quantized_spec import quantized_spec

    model, runners, xs = tiny
    runner = runners[mode]
    em = error_model(runner, model.network.lower())
    found, wrong = 0, 0
    for i, x in enumerate(xs):
        region = _region(x, 20 + i)
        label = int(runner.predict(x[None]).argmax())
        try:
            spec = quantized_spec(em, region, label).spec
        except ValueError:  # a static grid may saturate: no model
            continue
        pts = np.concatenate(list(region.enumerate()))
        out = runner.predict(region.points(pts).astype(np.float32)).astype(np.float64)
        lowest = (out[:, [label]] - out[:, spec.others]).min(axis=0) + 1e-4
        b = linear_bounds(spec, region.lo, region.hi)
        exact = replace(spec, err=[None] * len(spec.err), first_input=None, cap=None, lattice=None)
        for r in range(len(lowest)):  # one margin at a time: the others' thresholds far below
            target = np.where(np.arange(len(lowest)) == r, lowest, -1e9)
            res = milp_decide(spec, region.lo, region.hi, b, 20.0, target)
            if spec.cap is not None and spec.cap[r] <= target[r]:  # the clamp may decide
                assert res.status == "unknown"
                continue
            assert res.status == "sat", (i, r, res)
            assert np.all((res.coeffs >= region.lo) & (res.coeffs <= region.hi))
            found += 1
            wrong += milp_decide(exact, region.lo, region.hi, b, 20.0, target).status == "unsat"
    assert found >= 12 and wrong >= 1
