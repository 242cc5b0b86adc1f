"""How far a quantized runner strays from the float model on labelled inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantize.runner import Runner
from verifier.errors import InputError


def agreement(float_model: Runner, runner: Runner, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Agreement rate of the two models' labels, both accuracies, and the accuracy drop."""
    y = np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"agreement needs as many labels as inputs (>0): {len(x)} vs {len(y)}")
    fp = float_model.predict(x).argmax(axis=1)
    qp = runner.predict(x).argmax(axis=1)
    float_acc, quant_acc = float(np.mean(fp == y)), float(np.mean(qp == y))
    return {
        "inputs": int(len(y)),
        "agreement": float(np.mean(fp == qp)),
        "disagreements": int(np.sum(fp != qp)),
        "float_accuracy": float_acc,
        "quantized_accuracy": quant_acc,
        "accuracy_drop": float_acc - quant_acc,
    }
