"""Aggregation of per-input records into the sets of SPEC section 4 and their percentages.

Every input lands in exactly one float set (`L_ic`, `R`, `R_NOT`, float unknown) and, for each
quantized model, inputs of `R` in exactly one of `R_Q^FP`, `R^FP`, unknown, inputs of `R_NOT`
in exactly one of `R_Q`, `R^0`, unknown. Unknowns are counted, never hidden. All shares are
percentages in [0, 100], or None when the denominator is 0. Each measure a set's unknowns can
move also comes as a range `{lo, hi}` (`*_range`): its value when every undecided input falls
outside, or inside, the set.

MCTS mode (the float outcome is `not-refuted`): the search's IP set plays the region, so the
input counts as robust (`R`) and the quantized model keeps it (`R_Q^FP`) when it is
`not-refuted` with no replayed IP point misclassified. In exact mode a quantized
`not-refuted` proves nothing and counts as unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from verifier.engine.result import CERTIFIED, NOT_REFUTED, REFUTED
from verifier.run.records import InputRecord

# Set names, as used in `sets` dictionaries, reports and results.json.
L_CC, L_IC, R, R_NOT, FLOAT_UNKNOWN = "L_cc", "L_ic", "R", "R_NOT", "float_unknown"
RQ_FP, R_FP, R_UNKNOWN = "R_Q^FP", "R^FP", "R_unknown"
R_Q, R_0, R_NOT_UNKNOWN = "R_Q", "R^0", "R_NOT_unknown"
FLOAT_SETS = (L_CC, L_IC, R, R_NOT, FLOAT_UNKNOWN)
QUANT_SETS = (RQ_FP, R_FP, R_UNKNOWN, R_Q, R_0, R_NOT_UNKNOWN)


def percent(num: int, den: int) -> float | None:
    """100 * num / den, or None when there is nothing to divide by."""
    return None if den == 0 else 100.0 * num / den


def percent_range(hits: int, unknown: int, total: int) -> dict | None:
    """`{"lo", "hi"}` in percent: the share when every undecided input falls outside (lo) or
    inside (hi) the set; None when there is nothing to divide by (SPEC section 4)."""
    if total == 0:
        return None
    return {"lo": 100.0 * hits / total, "hi": 100.0 * (hits + unknown) / total}


def format_range(rng: dict | None, digits: int = 2, unit: str = "%") -> str:
    """`12.50%`, or `12.50..20.00%` when undecided inputs leave a range, or `n/a`."""
    if rng is None:
        return "n/a"
    lo, hi = rng["lo"], rng["hi"]
    if abs(hi - lo) < 1e-12:
        return f"{lo:.{digits}f}{unit}"
    return f"{lo:.{digits}f}..{hi:.{digits}f}{unit}"


def float_set(rec: InputRecord) -> str:
    """Which float set the input belongs to: L_ic, R, R_NOT or float_unknown."""
    if not rec.correct:
        return L_IC
    f = rec.float
    if f is None:
        return FLOAT_UNKNOWN
    if f.status == REFUTED:
        return R_NOT
    if f.status in (CERTIFIED, NOT_REFUTED):
        return R
    return FLOAT_UNKNOWN


def quant_set(rec: InputRecord, name: str) -> str | None:
    """Which quantized set the input belongs to for model `name` (None outside R and R_NOT)."""
    fset = float_set(rec)
    q = rec.quantized.get(name)
    if fset == R:
        if q is None:
            return R_UNKNOWN
        if q.status == REFUTED or q.ip_misclassified > 0:
            return R_FP
        mcts = rec.float is not None and rec.float.status == NOT_REFUTED
        if q.status == CERTIFIED or (mcts and q.status == NOT_REFUTED):
            return RQ_FP
        return R_UNKNOWN
    if fset == R_NOT:
        if q is None or q.transfer is None:
            return R_NOT_UNKNOWN
        return R_0 if q.transfer else R_Q
    return None


def quant_adv_label(rec: InputRecord, name: str) -> int | None:
    """The quantized model's wrong label: at its own counterexample (R^FP), the float one (R^0)."""
    q = rec.quantized.get(name)
    qset = quant_set(rec, name)
    if q is None:
        return None
    if qset == R_FP:
        return q.adv_label
    if qset == R_0:
        return q.transfer_label
    return None


@dataclass
class LabelMatrix:
    """Counts of (true label, adversarial label) pairs; rows and columns follow `labels`."""

    labels: list[int]
    counts: list[list[int]]

    @classmethod
    def build(cls, pairs: Sequence[tuple[int, int]], labels: Sequence[int]) -> LabelMatrix:
        """Count the pairs over the union of `labels` and the labels the pairs use."""
        all_labels = sorted({*labels, *(a for p in pairs for a in p)})
        pos = {lab: i for i, lab in enumerate(all_labels)}
        counts = [[0] * len(all_labels) for _ in all_labels]
        for true, adv in pairs:
            counts[pos[true]][pos[adv]] += 1
        return cls(all_labels, counts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FloatCounts:
    """Sizes of the float sets over a group of inputs."""

    inputs: int = 0
    l_cc: int = 0
    l_ic: int = 0
    r: int = 0
    r_not: int = 0
    unknown: int = 0

    def add(self, fset: str) -> None:
        self.inputs += 1
        if fset == L_IC:
            self.l_ic += 1
            return
        self.l_cc += 1
        if fset == R:
            self.r += 1
        elif fset == R_NOT:
            self.r_not += 1
        else:
            self.unknown += 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy"] = percent(self.l_cc, self.inputs)
        d["robust"] = percent(self.r, self.l_cc)
        d["effective"] = percent(self.r_not, self.l_cc)  # the paper's Fig. 6 measure
        d["unknown_share"] = percent(self.unknown, self.l_cc)
        d["robust_range"] = percent_range(self.r, self.unknown, self.l_cc)
        d["effective_range"] = percent_range(self.r_not, self.unknown, self.l_cc)
        return d


@dataclass
class QuantCounts:
    """Sizes of one quantized model's sets over a group of inputs, with the float sets beside."""

    inputs: int = 0
    l_cc: int = 0
    r: int = 0
    r_not: int = 0
    float_unknown: int = 0
    rq_fp: int = 0
    r_fp: int = 0
    r_unknown: int = 0
    r_q: int = 0
    r0: int = 0
    r_not_unknown: int = 0
    ep_replayed: int = 0
    ep_transferred: int = 0
    predicted: int = 0  # inputs with a clean quantized prediction
    correct: int = 0  # ... equal to the true label
    agree: int = 0  # ... equal to the float prediction

    def add(self, rec: InputRecord, name: str) -> None:
        fset, qset = float_set(rec), quant_set(rec, name)
        self.inputs += 1
        if name in rec.quantized_pred:
            qp = rec.quantized_pred[name]
            self.predicted += 1
            self.correct += int(qp == rec.label)
            self.agree += int(qp == rec.pred)
        if fset == L_IC:
            return
        self.l_cc += 1
        attr = {R: "r", R_NOT: "r_not", FLOAT_UNKNOWN: "float_unknown"}[fset]
        setattr(self, attr, getattr(self, attr) + 1)
        if qset is not None:
            attr = {
                RQ_FP: "rq_fp",
                R_FP: "r_fp",
                R_UNKNOWN: "r_unknown",
                R_Q: "r_q",
                R_0: "r0",
                R_NOT_UNKNOWN: "r_not_unknown",
            }[qset]
            setattr(self, attr, getattr(self, attr) + 1)
        q = rec.quantized.get(name)
        if q is not None:
            self.ep_replayed += q.ep_replayed
            self.ep_transferred += q.ep_transferred

    @property
    def undecided(self) -> int:
        """Inputs of L_cc left without a final set: float or quantized unknown."""
        return self.float_unknown + self.r_unknown + self.r_not_unknown

    def to_dict(self) -> dict:
        d = asdict(self)
        d["relative_robustness"] = percent(self.rq_fp, self.r)
        d["adversarial_transfer"] = percent(self.r0, self.r_not)
        d["relative_robustness_range"] = percent_range(self.rq_fp, self.r_unknown, self.r)
        d["adversarial_transfer_range"] = percent_range(self.r0, self.r_not_unknown, self.r_not)
        d["ep_transfer"] = percent(self.ep_transferred, self.ep_replayed)
        d["undecided"] = self.undecided
        d["unknown_share"] = percent(self.undecided, self.l_cc)
        d["r_unknown_share"] = percent(self.r_unknown, self.r)
        d["r_not_unknown_share"] = percent(self.r_not_unknown, self.r_not)
        d["accuracy"] = percent(self.correct, self.predicted)
        d["agreement"] = percent(self.agree, self.predicted)
        return d


@dataclass
class ModelAggregate:
    """One quantized model: overall and per-label counts, its adversarial matrix, its sets."""

    name: str
    overall: QuantCounts
    per_label: dict[int, QuantCounts]
    matrix: LabelMatrix
    sets: dict[str, list[int]]

    def to_dict(self) -> dict:
        return {
            "overall": self.overall.to_dict(),
            "per_label": {str(k): v.to_dict() for k, v in sorted(self.per_label.items())},
            "matrix": self.matrix.to_dict(),
            "sets": self.sets,
        }


@dataclass
class Aggregate:
    """Float and quantized sets: counts, percentages, (true, adversarial) matrices, index lists."""

    float_overall: FloatCounts
    float_per_label: dict[int, FloatCounts]
    float_matrix: LabelMatrix
    sets: dict[str, list[int]]
    models: dict[str, ModelAggregate] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "float": {
                "overall": self.float_overall.to_dict(),
                "per_label": {str(k): v.to_dict() for k, v in sorted(self.float_per_label.items())},
                "matrix": self.float_matrix.to_dict(),
                "sets": self.sets,
            },
            "quantized": {name: m.to_dict() for name, m in self.models.items()},
        }


def model_names(records: Sequence[InputRecord]) -> list[str]:
    """Quantized model names seen in the records, in first-seen order."""
    names: dict[str, None] = {}
    for rec in records:
        names.update(dict.fromkeys(rec.quantized))
        names.update(dict.fromkeys(rec.quantized_pred))
    return list(names)


def aggregate(records: Sequence[InputRecord], models: Sequence[str] | None = None) -> Aggregate:
    """Sets, counts and percentages over `records`, for the float model and each quantized one."""
    records = sorted(records, key=lambda r: r.index)
    labels = sorted({r.label for r in records})
    fsets = {r.index: float_set(r) for r in records}
    overall, per_label = FloatCounts(), {lab: FloatCounts() for lab in labels}
    sets: dict[str, list[int]] = {name: [] for name in FLOAT_SETS}
    for rec in records:
        fset = fsets[rec.index]
        overall.add(fset)
        per_label[rec.label].add(fset)
        sets[fset].append(rec.index)
        if fset != L_IC:
            sets[L_CC].append(rec.index)
    float_pairs = [
        (r.label, r.float.adv_label)
        for r in records
        if fsets[r.index] == R_NOT and r.float is not None and r.float.adv_label is not None
    ]
    names = model_names(records) if models is None else list(models)
    return Aggregate(
        overall,
        per_label,
        LabelMatrix.build(float_pairs, labels),
        sets,
        {name: aggregate_model(records, name, labels) for name in names},
    )


def aggregate_model(
    records: Sequence[InputRecord], name: str, labels: Sequence[int]
) -> ModelAggregate:
    """One quantized model's counts, per-label counts, (true, adversarial) matrix and sets."""
    overall, per_label = QuantCounts(), {lab: QuantCounts() for lab in labels}
    sets: dict[str, list[int]] = {s: [] for s in QUANT_SETS}
    pairs = []
    for rec in records:
        overall.add(rec, name)
        per_label.setdefault(rec.label, QuantCounts()).add(rec, name)
        qset = quant_set(rec, name)
        if qset is not None:
            sets[qset].append(rec.index)
        adv = quant_adv_label(rec, name)
        if adv is not None:
            pairs.append((rec.label, adv))
    return ModelAggregate(name, overall, per_label, LabelMatrix.build(pairs, labels), sets)
