"""Feature selection per input: which input values a region manipulates, and in which groups.

Three heuristics: DLV's activation heuristic (largest `|x_i - mean(x)|`, stable order),
gradient saliency of the logit margin (from the layer list, in numpy), and seeded random.
Each returns positions of the flat input, most important first; `chunk` groups them.
"""

from __future__ import annotations

import numpy as np

from verifier.engine.network import LoweredLayer, jacobian
from verifier.errors import InputError

SELECTIONS = ("activation", "gradient", "random")


def activation_order(x: np.ndarray) -> np.ndarray:
    """Positions by decreasing `|x_i - mean(x)|`, ties by position (DLV's heuristic)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return np.argsort(-np.abs(x - x.mean()), kind="stable")


def margin_gradient(chain: list[LoweredLayer], x: np.ndarray, label: int) -> np.ndarray:
    """Gradient of `logit[label] - max other logit` at `x`, through the lowered chain."""
    logits, jac = jacobian(chain, x)
    other = np.delete(np.arange(len(logits)), label)
    runner_up = other[np.argmax(logits[other])]
    return jac[label] - jac[runner_up]


def gradient_order(chain: list[LoweredLayer], x: np.ndarray, label: int) -> np.ndarray:
    """Positions by decreasing `|d margin / d x_i|`, ties by position."""
    return np.argsort(-np.abs(margin_gradient(chain, x, label)), kind="stable")


def random_order(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of the positions."""
    return np.random.default_rng(seed).permutation(n)


def select_positions(
    method: str, x: np.ndarray, *, chain=None, label: int | None = None, seed: int = 0
) -> np.ndarray:
    """Positions of the flat input in the order `method` ranks them."""
    if method == "activation":
        return activation_order(x)
    if method == "gradient":
        if chain is None or label is None:
            raise ValueError("gradient selection needs the lowered network and the label")
        return gradient_order(chain, x, label)
    if method == "random":
        return random_order(np.asarray(x).size, seed)
    raise InputError(
        f"unknown feature selection {method!r}: expected one of {', '.join(SELECTIONS)}"
    )


def chunk(order: np.ndarray, feature_dims: int, count: int | None = None) -> list[np.ndarray]:
    """Group ordered positions into features of `feature_dims` values (the last may be shorter)."""
    if feature_dims <= 0:
        raise InputError(f"--feature-dims must be positive, got {feature_dims}")
    groups = [order[i : i + feature_dims] for i in range(0, len(order), feature_dims)]
    return groups if count is None else groups[:count]
