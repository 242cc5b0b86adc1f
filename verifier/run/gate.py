"""The CI gate: thresholds and a baseline run checked against a run's aggregates.

All thresholds, values and the baseline tolerance are percentages (0-100, tolerance in
percentage points), the unit the reports print. A measure that is undefined (no input in its
denominator, e.g. relative robustness with an empty `R`) is not checked: there is nothing to
lose. Where undecided inputs leave a measure a range `lo..hi`, a minimum is checked against
`lo` and a maximum against `hi` (SPEC section 4): an unknown never passes a gate it could fail.
The caller maps "no failures" to exit status 0 and any failure to 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from verifier.errors import InputError
from verifier.run.records import FLOAT
from verifier.run.relative import Aggregate

# measure -> (direction, where it lives: "float" or "quantized"); higher is better for "min".
MEASURES = {
    "relative_robustness": ("min", "quantized"),
    "adversarial_transfer": ("max", "quantized"),
    "unknown_share": ("max", "both"),
    "accuracy": ("min", "both"),
}
# measures that undecided inputs leave a range, and where the range lives in the aggregates
RANGES = {
    "relative_robustness": "relative_robustness_range",
    "adversarial_transfer": "adversarial_transfer_range",
}


@dataclass(frozen=True)
class Thresholds:
    """Limits in percent (0-100); None leaves a measure unchecked."""

    min_relative_robustness: float | None = None
    max_transfer: float | None = None
    max_unknown: float | None = None
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and not 0.0 <= value <= 100.0:
                option = "--" + key.replace("_", "-")
                raise InputError(f"{option} is a percentage in [0, 100], got {value:g}")

    def limits(self) -> dict[str, tuple[str, float]]:
        """measure -> (direction, limit) for the thresholds that are set."""
        pairs = {
            "relative_robustness": self.min_relative_robustness,
            "adversarial_transfer": self.max_transfer,
            "unknown_share": self.max_unknown,
            "accuracy": self.min_accuracy,
        }
        return {m: (MEASURES[m][0], v) for m, v in pairs.items() if v is not None}


# each threshold as the gate understands it (the summary and the report echo these)
UNDERSTOOD = {
    "min_relative_robustness": "relative robustness of each quantized model at least {v:g}% "
    "(checked against the lower end of its range)",
    "max_transfer": "adversarial transfer of each quantized model at most {v:g}% "
    "(checked against the upper end of its range)",
    "max_unknown": "undecided inputs at most {v:g}% of the correctly classified ones",
    "min_accuracy": "clean accuracy of every model at least {v:g}%",
}


def understood(thresholds: dict) -> list[str]:
    """One line per set threshold (option name -> percent), saying how it is checked."""
    return [UNDERSTOOD[k].format(v=v) for k, v in thresholds.items() if v is not None]


@dataclass(frozen=True)
class GateFailure:
    """One measure of one model that missed its limit, and by how many percentage points."""

    measure: str
    model: str
    value: float
    limit: float
    miss: float
    direction: str  # "min": the value must be at least the limit; "max": at most
    against: str = "threshold"  # or "baseline"

    @property
    def message(self) -> str:
        side = "below the minimum" if self.direction == "min" else "above the maximum"
        source = ""
        if self.against == "baseline":
            sign = "minus" if self.direction == "min" else "plus"
            source = f" (baseline {sign} tolerance)"
        end = ""
        if self.measure in RANGES:
            end = " (lower end of its range)" if self.direction == "min" else " (upper end)"
        return (
            f"{self.measure}{end} of {self.model} is {self.value:.2f}%, {side} "
            f"{self.limit:.2f}%"
            f"{source} by {self.miss:.2f} percentage points"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def measures(aggregates: Aggregate | dict) -> dict[tuple[str, str], float]:
    """(measure, model) -> value for every gated measure that is defined in `aggregates`: the
    `lo` end of a ranged "min" measure, the `hi` end of a ranged "max" one."""
    agg = aggregates.to_dict() if isinstance(aggregates, Aggregate) else aggregates
    out: dict[tuple[str, str], float | None] = {}
    quantized = agg.get("quantized", {})
    fl = agg.get("float", {}).get("overall", {})
    out[("accuracy", FLOAT)] = fl.get("accuracy")
    if not quantized:
        out[("unknown_share", FLOAT)] = fl.get("unknown_share")
    for name, m in quantized.items():
        for measure, (direction, _) in MEASURES.items():
            rng = m["overall"].get(RANGES.get(measure, ""))
            end = "lo" if direction == "min" else "hi"
            out[(measure, name)] = rng[end] if rng else m["overall"].get(measure)
    return {k: v for k, v in out.items() if v is not None}


def _miss(direction: str, value: float, limit: float) -> float:
    """Percentage points by which `value` misses `limit` (<= 0 when it does not)."""
    return limit - value if direction == "min" else value - limit


def check_gate(
    aggregates: Aggregate | dict,
    thresholds: Thresholds,
    baseline: dict | None = None,
    tolerance: float = 0.0,
) -> list[GateFailure]:
    """Every threshold and baseline comparison the run misses (empty: the gate passes)."""
    if tolerance < 0:
        raise InputError(f"--tolerance must be >= 0 percentage points, got {tolerance:g}")
    now = measures(aggregates)
    failures = []
    for measure, (direction, limit) in thresholds.limits().items():
        for (m, model), value in now.items():
            if m == measure and _miss(direction, value, limit) > 1e-9:
                failures.append(
                    GateFailure(
                        measure, model, value, limit, _miss(direction, value, limit), direction
                    )
                )
    if baseline is not None:
        before = measures(baseline.get("aggregates", baseline))
        for (measure, model), value in now.items():
            if (measure, model) not in before:
                continue
            direction = MEASURES[measure][0]
            step = -tolerance if direction == "min" else tolerance
            limit = before[(measure, model)] + step
            if _miss(direction, value, limit) > 1e-9:
                failures.append(
                    GateFailure(
                        measure,
                        model,
                        value,
                        limit,
                        _miss(direction, value, limit),
                        direction,
                        "baseline",
                    )
                )
    return failures


def load_baseline(path: str | Path) -> dict:
    """The aggregates of a previous run's results.json, for `check_gate(baseline=...)`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the baseline {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"the baseline {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or "aggregates" not in doc:
        raise InputError(f"the baseline {path} is not a results.json (no 'aggregates')")
    major = str(doc.get("schema_version", "")).split(".")[0]
    if major != "1":
        raise InputError(
            f"the baseline {path} has schema version {doc.get('schema_version')!r}; "
            "this tool reads 1.x"
        )
    return doc["aggregates"]


def gate_summary(
    thresholds: Thresholds,
    failures: list[GateFailure],
    baseline: str | None = None,
    tolerance: float = 0.0,
) -> dict:
    """The `gate` section of results.json: what was checked and what failed."""
    return {
        "passed": not failures,
        "thresholds": {k: v for k, v in asdict(thresholds).items() if v is not None},
        "baseline": baseline,
        "tolerance": tolerance,
        "failures": [f.to_dict() for f in failures],
    }
