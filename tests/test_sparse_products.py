"""The bounds' products through CSR copies of sparse lowered weights (`bounds.weights`,
`bounds.left_times`) give the dense bounds, and decisions that agree with enumeration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_builders import cnn_hidden_hybrid_nhwc
from test_diffbounds import float_then_quantized
from test_engine import check_decision

from quantize.error_model import error_model
from quantize.modes import float_runner, quantize_model
from verifier.engine import bounds
from verifier.engine.bounds import linear_bounds, prepare_chain, sparse_weight, spec_chain
from verifier.engine.decide import decide
from verifier.engine.model import load_model
from verifier.engine.network import Affine
from verifier.engine.quantized_spec import quantized_spec
from verifier.engine.regions import feature_region

MODES = ["int8", "ort-qdq"]


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """An 8x8 two-convolution CNN (128 x 64 and 64 x 128 lowered, 12% and 39% non-zero, then a
    dense 3 x 64), its quantized runners per mode, and a few inputs."""
    d = tmp_path_factory.mktemp("sparse")
    model = load_model(cnn_hidden_hybrid_nhwc(d / "cnn.onnx", seed=2))
    rng = np.random.default_rng(0)
    calib = rng.random((64, 8, 8, 1), dtype=np.float32)
    runners = {m: quantize_model(model, m, d, calib) for m in [*MODES, "ort-dynamic"]}
    return model, runners, rng.random((4, 64), dtype=np.float32)


@pytest.fixture
def sparse_convs(monkeypatch):
    """Thresholds under which this CNN's convolutions are kept sparse, its dense layer not."""
    monkeypatch.setattr(bounds, "SPARSE_SIZE", 0)
    monkeypatch.setattr(bounds, "SPARSE_DENSITY", 0.5)


def _region(x: np.ndarray, seed: int, radius: float):
    feats = np.array_split(np.random.default_rng(seed).permutation(x.size), 16)
    return feature_region(x, feats, step=0.125, radius=radius)


def _all_bounds(spec) -> list[np.ndarray]:
    """Root bounds (kept rows), with optimised slopes, and children fixing a generator each."""
    lo, hi = spec.region.lo, spec.region.hi
    root = linear_bounds(spec, lo, hi, reuse=True)
    slopes = linear_bounds(spec, lo, hi, alpha_steps=5, target=np.inf)
    out = [root.lower, root.coeffs, slopes.lower, slopes.coeffs]
    out += [v for p in root.pre if p is not None for v in p]
    for g in np.flatnonzero(hi > lo)[:4]:
        for v in (lo[g], hi[g]):
            clo, chi = lo.copy(), hi.copy()
            clo[g] = chi[g] = v
            b = linear_bounds(spec, clo, chi, parent=root, reuse=True)
            out += [b.lower] + [w for p in b.pre if p is not None for w in p]
    return out


def _dense_and_sparse(make, monkeypatch) -> tuple[list, list]:
    """`_all_bounds` of the spec `make()` builds, dense, then with the convolutions sparse."""
    monkeypatch.setattr(bounds, "SPARSE_SIZE", 10**12)
    dense = _all_bounds(make())
    monkeypatch.setattr(bounds, "SPARSE_SIZE", 0)
    monkeypatch.setattr(bounds, "SPARSE_DENSITY", 0.5)
    spec = make()
    middle = [layer for layer in spec.layers[1:-1] if isinstance(layer, Affine)]
    assert [sparse_weight(layer.weight) is not None for layer in middle] == [True]
    return dense, _all_bounds(spec)


def test_sparse_forms_of_the_example_cnn():
    """At the shipped thresholds the MNIST CNN's convolutions get CSR forms, its dense layer
    none, and products through them equal the dense ones."""
    example = Path(__file__).resolve().parents[1] / "examples" / "mnist_cnn.onnx"
    chain = prepare_chain(load_model(example).network.lower())
    affine = [layer for layer in chain.layers if isinstance(layer, Affine)]
    assert [sparse_weight(layer.weight) is not None for layer in affine] == [True, True, False]
    w, aw = affine[1].weight, chain.absw[2]
    rng = np.random.default_rng(0)
    x, lam = rng.normal(size=(w.shape[1], 7)), rng.normal(size=(5, w.shape[0]))
    rows, cols = np.array([3, 40, 41, 500]), np.arange(0, w.shape[1], 3)
    assert np.allclose(bounds.weights(w, rows) @ x, w[rows] @ x, rtol=0, atol=1e-12)
    got = bounds.weights(aw, rows)[:, cols] @ x[cols]
    assert np.allclose(got, aw[rows][:, cols] @ x[cols], rtol=0, atol=1e-12)
    assert np.allclose(bounds.left_times(lam, w), lam @ w, rtol=0, atol=1e-12)
    assert np.allclose(bounds.left_times(x.T, w, transpose=True), x.T @ w.T, rtol=0, atol=1e-12)


def test_a_weight_with_the_same_pattern_takes_its_forms_from_the_other():
    """`with_values_at`: a weight changed on its non-zeros only (as `box_rounding.on_box`
    changes the first layer's per box) gets CSR forms built from the original's structure, and
    products through them are its own, not the original's."""
    example = Path(__file__).resolve().parents[1] / "examples" / "mnist_cnn.onnx"
    w = prepare_chain(load_model(example).network.lower()).layers[2].weight
    rng = np.random.default_rng(1)
    flat = np.flatnonzero(w)
    values = w.reshape(-1)[flat] + rng.normal(size=len(flat))
    before = w.copy()
    changed = bounds.with_values_at(w, flat, values)
    assert np.array_equal(w, before)
    assert np.array_equal(changed, _scatter(w.shape, flat, values))
    forms = sparse_weight(changed)
    assert forms is not None and forms.csr.nnz == np.count_nonzero(w)
    x, lam = rng.normal(size=(w.shape[1], 7)), rng.normal(size=(5, w.shape[0]))
    assert np.allclose(bounds.weights(changed) @ x, changed @ x, rtol=0, atol=1e-12)
    assert np.allclose(bounds.weights(changed, np.arange(3)) @ x, changed[:3] @ x, atol=1e-12)
    assert np.allclose(bounds.left_times(lam, changed), lam @ changed, rtol=0, atol=1e-12)


def _scatter(shape: tuple, flat: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(shape)
    out.reshape(-1)[flat] = values
    return out


def test_float_bounds_equal_dense(conv, monkeypatch):
    model, _, xs = conv
    chain = prepare_chain(model.network.lower())
    label = int(np.argmax(model.network.forward(xs[:1].reshape(1, 8, 8, 1))[0]))
    region = _region(xs[0], 0, 2.0)
    dense, sparse = _dense_and_sparse(lambda: spec_chain(chain, region, label), monkeypatch)
    for a, b in zip(dense, sparse, strict=True):
        assert np.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_bounds_equal_dense(conv, monkeypatch, mode):
    model, runners, xs = conv
    em = error_model(runners[mode], prepare_chain(model.network.lower()))
    compared = 0
    for i, x in enumerate(xs):
        region = _region(x, i, 1.0)
        label = int(runners[mode].predict(x[None].reshape(1, 8, 8, 1)).argmax())
        try:
            dense, sparse = _dense_and_sparse(
                lambda region=region, label=label: quantized_spec(em, region, label).spec,
                monkeypatch,
            )
        except ValueError:  # a static grid may saturate over this region: no bound at all
            continue
        for a, b in zip(dense, sparse, strict=True):
            assert np.allclose(a, b, rtol=0, atol=1e-10)
        compared += 1
    assert compared >= 2


def test_exact_first_input_charges_equal_dense(conv, monkeypatch):
    """ORT dynamic quantizes the first convolution's input at run time; that rounding charged
    exactly per row (`_first_input_rows`' |lam W| . step through the first layer's columns,
    here for every row) gives the dense bounds through the CSR forms, the columns' forms
    sliced from the layer's own (`_rounded_columns`)."""
    model, runners, xs = conv
    em = error_model(runners["ort-dynamic"], prepare_chain(model.network.lower()))
    monkeypatch.setattr(bounds, "CHEAP_CHARGE", -1.0)  # every row charged exactly
    monkeypatch.setattr(bounds, "SPREAD", -1.0)  # ... and through the rows, not per neuron
    calls = []
    exact_rows = bounds._first_input_rows
    monkeypatch.setattr(bounds, "_first_input_rows", lambda *a: calls.append(1) or exact_rows(*a))
    compared = 0
    for i, x in enumerate(xs):
        region = _region(x, i, 1.0)
        label = int(runners["ort-dynamic"].predict(x[None].reshape(1, 8, 8, 1)).argmax())
        make = lambda region=region, label=label: quantized_spec(em, region, label).spec  # noqa: E731
        dense, sparse = _dense_and_sparse(make, monkeypatch)
        for a, b in zip(dense, sparse, strict=True):
            assert np.allclose(a, b, rtol=0, atol=1e-10)
        compared += 1
    assert compared == len(xs) and calls


def test_float_decisions_agree_with_enumeration(conv, sparse_convs):
    model, _, xs = conv
    runner = float_runner(model)
    chain = prepare_chain(model.network.lower())
    statuses = []
    for i, x in enumerate(xs):
        for radius in (1.0, 3.0):
            region = _region(x, 10 + i, radius)
            label = int(runner.predict(x[None].reshape(1, 8, 8, 1)).argmax())
            d = decide(runner, chain, region, label, timeout=20, enum_limit=0, use_smt=False)
            check_decision(d, runner, region, label)
            statuses.append(d.status)
    assert "certified" in statuses, statuses


@pytest.mark.parametrize("mode", MODES)
def test_quantized_decisions_agree_with_enumeration(conv, sparse_convs, mode):
    model, runners, xs = conv
    runner = runners[mode]
    chain = prepare_chain(model.network.lower())
    em = error_model(runner, chain)
    statuses = []
    for i, x in enumerate(xs):
        region = _region(x, 20 + i, 1.0)
        label = int(runner.predict(x[None].reshape(1, 8, 8, 1)).argmax())
        assert region.count(10**6) > 16
        _, d = float_then_quantized(model, runner, em, chain, region, label, 16)
        if d is not None:
            check_decision(d, runner, region, label)
            statuses.append(d.status)
    assert "certified" in statuses, statuses
