"""Simulated n-bit quantization of the lowered chain in numpy, mirroring `quantize.simulated`.

Weights of every `Affine` are fake-quantized (symmetric, per tensor by default); activations
entering every `Affine` (the input, then each ReLU output) are fake-quantized with scales
calibrated by min / max, exactly as the `simulated` mode's ONNX graph does. The chain gives
per-layer activations (for feature divergence) and, weights only, input gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantize.simulated import activation_scale, fake_quantize
from verifier.engine.network import Affine, LoweredLayer, MaxPool, Relu


@dataclass(frozen=True)
class SimChain:
    """A lowered chain with fake-quantized weights, and the activation quantizers (or none)."""

    name: str
    layers: list[LoweredLayer]
    act: tuple[tuple[float, float, float], ...] = ()  # (scale, qmin, qmax) per Affine input


def quantize_weights(
    chain: list[LoweredLayer], bits: int, per_channel: bool = False
) -> list[LoweredLayer]:
    """The chain with every Affine weight fake-quantized to `bits` (biases stay float)."""
    out: list[LoweredLayer] = []
    for layer in chain:
        if isinstance(layer, Affine):
            q, _ = fake_quantize(layer.weight, bits, 0 if per_channel else None)
            layer = Affine(q, layer.bias)
        out.append(layer)
    return out


def affine_inputs(chain: list[LoweredLayer], x: np.ndarray) -> list[np.ndarray]:
    """The tensors entering each Affine of the (float) chain, for a batch of flat inputs."""
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    seen = []
    for layer in chain:
        if isinstance(layer, Affine):
            seen.append(a)
        a = _apply(layer, a)
    return seen


def calibrate(
    chain: list[LoweredLayer], calib: np.ndarray, bits: int
) -> tuple[tuple[float, float, float], ...]:
    """(scale, qmin, qmax) of each Affine input from min / max over the calibration set."""
    out = []
    for a in affine_inputs(chain, calib):
        s, qmin, qmax = activation_scale(float(a.min()), float(a.max()), bits)
        out.append((float(np.float32(s)), qmin, qmax))
    return tuple(out)


def sim_chain(
    chain: list[LoweredLayer],
    weight_bits: int,
    act_bits: int = 0,
    calib: np.ndarray | None = None,
    per_channel: bool = False,
) -> SimChain:
    """The `simulated` mode of the chain: weights (0 = float) and activations (0 = float)."""
    layers = quantize_weights(chain, weight_bits, per_channel) if weight_bits else list(chain)
    act = ()
    if act_bits:
        assert calib is not None, "activation quantization needs a calibration set"
        act = calibrate(layers, calib, act_bits)
    w = f"w{weight_bits}" if weight_bits else ""
    a = f"a{act_bits}" if act_bits else ""
    return SimChain(f"sim-{w}{a}" if w or a else "float", layers, act)


def activations(sc: SimChain, x: np.ndarray) -> list[np.ndarray]:
    """Output of every layer (after each Affine, ReLU, max pool) for flat inputs (N, n)."""
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    outs, k = [], 0
    for layer in sc.layers:
        if isinstance(layer, Affine) and sc.act:
            s, qmin, qmax = sc.act[k]
            a = np.clip(np.round(a / s), qmin, qmax) * s
            k += 1
        a = _apply(layer, a)
        outs.append(a)
    return outs


def logits(sc: SimChain, x: np.ndarray) -> np.ndarray:
    """Logits of the simulated chain."""
    return activations(sc, x)[-1]


def layer_names(chain: list[LoweredLayer]) -> list[str]:
    """Readable names of the chain's layers: dense1, relu1, dense2, ..."""
    names, counts = [], {"dense": 0, "relu": 0, "maxpool": 0}
    for layer in chain:
        kind = (
            "dense"
            if isinstance(layer, Affine)
            else "relu"
            if isinstance(layer, Relu)
            else "maxpool"
        )
        counts[kind] += 1
        names.append(f"{kind}{counts[kind]}")
    return names


def _apply(layer: LoweredLayer, a: np.ndarray) -> np.ndarray:
    if isinstance(layer, Affine):
        return a @ layer.weight.T + layer.bias
    if isinstance(layer, Relu):
        return np.maximum(a, 0.0)
    assert isinstance(layer, MaxPool)
    padded = np.concatenate([a, np.full((len(a), 1), -np.inf)], axis=1)
    return padded[:, layer.windows].max(axis=2)
