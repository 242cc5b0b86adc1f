"""The result vocabulary of a decision on one (model, input, region), used by every route."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CERTIFIED = "certified"  # every point of the region keeps the label, proven
REFUTED = "refuted"  # a point confirmed misclassified on the real runtime
UNKNOWN = "unknown"  # the time or node budget ran out
NOT_REFUTED = "not-refuted"  # a search (MCTS) found nothing; proves nothing
STATUSES = (CERTIFIED, REFUTED, UNKNOWN, NOT_REFUTED)

# Routes that can decide: which step of the procedure gave the answer.
ROUTES = (
    "attack",
    "bounds",
    "bab",
    "enumeration",
    "z3",
    "milp",
    "relu-split",
    "mcts",
    "budget",
    "replay",
)
# quantized models decided from the float model's proof (verifier.engine.diffdecide)
ROUTES += ("diff-root", "diff-leaves", "diff-bab")


@dataclass
class Decision:
    """Status, the route that decided it, and the confirmed perturbation when refuted."""

    status: str
    route: str
    coeffs: np.ndarray | None = None  # int64 generator coefficients of the counterexample
    adv_label: int | None = None  # the runtime's label at that point
    seconds: float = 0.0
    nodes: int = 0  # branch-and-bound nodes / MCTS rollouts used
    detail: dict = field(default_factory=dict)  # route-specific figures (bounds margin, ...)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, f"unknown status {self.status!r}"
        assert self.route in ROUTES, f"unknown route {self.route!r}"
        if self.status == REFUTED:
            assert self.coeffs is not None, "a refutation carries its coefficients"
