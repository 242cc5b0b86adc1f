"""The clamp of a quantized runtime's logits to their grid, bounded apart from the chain
(`verifier.engine.output_clamp`): pointwise on clamping runtimes (numpy and real int8 / ONNX Runtime
files), decisions against enumeration, and the cap shown to be needed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from onnx_builders import mlp
from test_dynamic_input import check_spec_holds
from test_engine import all_points, check_decision, random_case

from quantize.error_model import ErrorModel, Grid, Rounding, error_model
from quantize.modes import quantize_model
from verifier.engine.bounds import interval_bounds, linear_bounds, prepare_chain
from verifier.engine.decide import decide
from verifier.engine.model import load_model
from verifier.engine.network import Affine, forward_lowered
from verifier.engine.output_clamp import margin_caps
from verifier.engine.quantized_spec import quantized_spec
from verifier.engine.regions import lattice_region
from verifier.engine.result import CERTIFIED

STEP = 1 / 64  # the clamping runtimes' logit grid step


class ClampRuntime:
    """The chain in float32, its logits rounded to a grid of step STEP and clamped to [lo, hi]."""

    def __init__(self, chain, n: int, lo: float, hi: float):
        self.chain, self.input_shape, self.lo, self.hi = chain, (n,), lo, hi

    def predict(self, x):
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        y = forward_lowered(self.chain, x).astype(np.float32)
        return np.clip(np.round(y / STEP) * STEP, self.lo, self.hi).astype(np.float32)


def _clamp_case(seed: int):
    """(runtime, error model, chain, region, label) with a logit grid whose top lies below the
    label's logit somewhere in the region, above every other logit (so the label saturates)."""
    chain, _, region, label = random_case(seed)
    pts = all_points(region)
    y = forward_lowered(chain, region.points(pts))
    others = np.delete(y, label, axis=1).max()
    top = others + 0.25 * max(float(y[:, label].max() - others), 0.0) + STEP
    n = region.x.size
    runtime = ClampRuntime(chain, n, -50.0, top)
    grid = Grid(STEP, -50.0, top)
    rounding = [Rounding() if isinstance(x, Affine) else None for x in chain]
    rounding[-1] = Rounding(output_grid=grid)
    em = ErrorModel(prepare_chain(chain), rounding, "clamped logits")
    label = int(runtime.predict(region.x[None]).argmax())
    return runtime, em, chain, region, label


def _margins(runtime, region, label, others) -> np.ndarray:
    out = runtime.predict(region.points(all_points(region))).astype(np.float64)
    return out[:, [label]] - out[:, others]


@pytest.mark.parametrize("seed", range(16))
def test_clamped_logits_within_bounds(seed):
    """At every point: the runtime's logits lie within the widened point interval, and every
    margin lower bound (interval and linear, capped, and the root bounds the caps were read
    off) lies below every runtime margin; the caps read off the root equal those bounded from
    scratch."""
    runtime, em, _, region, label = _clamp_case(seed)
    qs = quantized_spec(em, region, label)
    spec = qs.spec
    pts = all_points(region)
    got = runtime.predict(region.points(pts)).astype(np.float64)
    for s, g in zip(pts, got, strict=True):
        lo, hi = qs.interval(s)
        assert np.all(lo <= g) and np.all(g <= hi)
    m = _margins(runtime, region, label, spec.others).min(axis=0)
    roots = [] if qs.root is None else [qs.root]
    for b in (
        interval_bounds(spec, region.lo, region.hi),
        linear_bounds(spec, region.lo, region.hi),
        *roots,
    ):
        assert np.all(b.lower <= m + 1e-9)
    if spec.cap is not None:
        scratch = margin_caps(em, qs.region, label, qs.errors, *qs.ends)
        assert np.allclose(spec.cap, scratch, rtol=0, atol=1e-9)


def test_the_cap_is_needed():
    """Without its cap, the unclamped margin's bound exceeds a clamped runtime margin
    somewhere (so the clamped cases above can fail), and the cap route is taken."""
    capped = wrong = 0
    for seed in range(16):
        runtime, em, _, region, label = _clamp_case(seed)
        spec = quantized_spec(em, region, label).spec
        if spec.cap is None:
            continue
        capped += 1
        free = linear_bounds(replace(spec, cap=None), region.lo, region.hi).lower
        wrong += bool(np.any(free > _margins(runtime, region, label, spec.others).min(axis=0)))
    assert capped >= 8 and wrong > 0


def test_clamped_decisions_agree_with_enumeration():
    """Through the bounds route (small enumeration limit): certified only where enumerating
    the clamping runtime finds no misclassified point; some certified with the cap."""
    capped = []
    for seed in range(12):
        runtime, em, chain, region, label = _clamp_case(seed)
        d = decide(
            runtime, chain, region, label, timeout=20, enum_limit=4, quantized=True, error_model=em
        )
        check_decision(d, runtime, region, label)
        capped.append((d.status, d.detail.get("output_clamp")))
    assert (CERTIFIED, "bounded apart") in capped


def real_copies(d, dynamic: bool = False):
    """A 16-40-20-4 MLP in `d`, its int8 TFLite and ONNX Runtime QDQ files (per tensor and per
    channel; and its dynamic-range TFLite file), and a few inputs."""
    model = load_model(mlp(d / "mlp.onnx", sizes=(16, 40, 20, 4), seed=5, gemm=False))
    rng = np.random.default_rng(0)
    calib = rng.random((64, 16), dtype=np.float32)
    runners = {
        "int8": quantize_model(model, "int8", d, calib),
        "ort-qdq": quantize_model(model, "ort-qdq", d, calib),
        "ort-qdq-pc": quantize_model(model, "ort-qdq", d, calib, per_channel=True),
    }
    if dynamic:
        runners["dynamic"] = quantize_model(model, "dynamic", d, calib)
    return model, runners, rng.random((6, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return real_copies(tmp_path_factory.mktemp("clamp"))


@pytest.mark.parametrize("name", ["int8", "ort-qdq", "ort-qdq-pc"])
def test_real_runtimes_within_bounds(real, name):
    """Real int8 and QDQ files: logits within the widened interval at every point of small
    regions, capped margin bounds below every runtime margin; the cap route is taken (per
    channel, this tiny net's logit grids are too narrow for its rounding: the old route)."""
    model, runners, xs = real
    runner = runners[name]
    em = error_model(runner, model.network.lower())
    capped = 0
    for i, x in enumerate(xs):
        pos = np.random.default_rng(i).choice(16, 3, replace=False)
        region = lattice_region(x, pos, 0.125, 0.75)
        label = int(runner.predict(x[None]).argmax())
        qs = quantized_spec(em, region, label)
        spec = qs.spec
        capped += spec.cap is not None
        check_spec_holds(runner, qs, region, label)
    assert capped >= 3 or name == "ort-qdq-pc"


@pytest.mark.parametrize("name", ["int8", "ort-qdq"])
def test_real_decisions_agree_with_enumeration(real, name):
    """Real int8 and QDQ files through the bounds route: decisions agree with enumerating the
    runtime, and the bounds certify some."""
    model, runners, xs = real
    runner = runners[name]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    statuses = []
    for i, x in enumerate(xs):
        pos = np.random.default_rng(10 + i).choice(16, 3, replace=False)
        region = lattice_region(x, pos, 0.03125, 0.25)
        label = int(runner.predict(x[None]).argmax())
        d = decide(
            runner, chain, region, label, timeout=30, enum_limit=64, quantized=True, error_model=em
        )
        check_decision(d, runner, region, label)
        statuses.append(d.status)
    assert CERTIFIED in statuses
