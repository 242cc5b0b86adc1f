"""Per-input records of a run: what each model (float, quantized) answered on one input.

These are what the run store commits as inputs are decided, what aggregation reads to build
the sets of SPEC section 4, and what `results.json` lists. Plain data, JSON round-trippable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from verifier.engine.result import CERTIFIED, UNKNOWN

FLOAT = "float"  # the model name of the float model in reports, junit.xml, perturbations, gates


@dataclass
class Outcome:
    """One model's answer on one input's region.

    For the float model: the decision on the region. For a quantized model: its own decision
    on the region (exact relative robustness when the float model is certified) and, when the
    float model was refuted, whether the float counterexample transfers to it.
    """

    status: str  # certified / refuted / unknown / not-refuted (verifier.engine.result)
    route: str  # which step decided it
    seconds: float = 0.0
    nodes: int = 0
    coeffs: list[int] | None = None  # this model's confirmed counterexample (generator coeffs)
    adv_label: int | None = None  # this model's label at that counterexample
    # quantized models on R_NOT inputs: the float model's representative counterexample replayed
    transfer: bool | None = None  # it still fools this model (input in R^0)
    transfer_label: int | None = None  # this model's label at the float counterexample
    # replay counts (MCTS mode: the recorded IP / EP sets; exact mode: confirmed EP points)
    ip_replayed: int = 0
    ip_misclassified: int = 0
    ep_replayed: int = 0
    ep_transferred: int = 0
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A copy as plain data (nothing shared with the outcome: callers may edit it)."""
        return {f.name: _copied(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Outcome:
        return cls(**d)


@dataclass
class InputRecord:
    """Everything decided about one test input (`float` is None for inputs in L_ic)."""

    index: int  # position in the source dataset
    label: int  # true label
    pred: int  # the float model's clean prediction
    float: Outcome | None = None
    quantized: dict[str, Outcome] = field(default_factory=dict)  # runner name -> outcome
    quantized_pred: dict[str, int] = field(default_factory=dict)  # clean predictions

    @property
    def correct(self) -> bool:
        return self.pred == self.label

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "label": self.label,
            "pred": self.pred,
            "float": self.float.to_dict() if self.float else None,
            "quantized": {k: v.to_dict() for k, v in self.quantized.items()},
            "quantized_pred": dict(self.quantized_pred),
        }

    @classmethod
    def from_dict(cls, d: dict) -> InputRecord:
        return cls(
            index=d["index"],
            label=d["label"],
            pred=d["pred"],
            float=Outcome.from_dict(d["float"]) if d.get("float") else None,
            quantized={k: Outcome.from_dict(v) for k, v in d.get("quantized", {}).items()},
            quantized_pred={k: int(v) for k, v in d.get("quantized_pred", {}).items()},
        )


def out_of_budget(rec: InputRecord) -> list[str]:
    """The quantized models whose decision on this input of R ran out of budget (route
    "budget"): what a larger `--quantized-timeout` re-decides on `--resume`."""
    if rec.float is None or rec.float.status != CERTIFIED:
        return []
    return [k for k, o in rec.quantized.items() if o.status == UNKNOWN and o.route == "budget"]


def with_redecided(old: InputRecord, new: InputRecord) -> InputRecord:
    """`old` with its out-of-budget quantized outcomes taken from `new`, the same input decided
    again with a larger quantized budget; `old` itself when the float decision did not certify
    it again (it is timed too). Every decided outcome stays: it holds at any budget."""
    if new.float is None or new.float.status != CERTIFIED:
        return old
    redo = set(out_of_budget(old))
    quantized = {k: new.quantized.get(k, o) if k in redo else o for k, o in old.quantized.items()}
    return replace(old, quantized=quantized)


def _copied(value):
    """A copy of JSON-like data (dicts and lists copied, scalars and tuples kept): what
    `dataclasses.asdict` gives for records, without its per-element deep copies, which made
    storing a record with explored MCTS points cost ~5 ms."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value
