"""The example images of a report: robust inputs with a random point of their region, refuted
inputs with their counterexample, and every model's answer on the perturbed image."""

from __future__ import annotations

import numpy as np

from verifier.config import Settings
from verifier.data import from_layout
from verifier.enumeration import runtime_inputs
from verifier.inputs import Inputs
from verifier.model import Model
from verifier.records import InputRecord
from verifier.regions import Region
from verifier.result import REFUTED


def report_examples(
    st: Settings,
    model: Model,
    chain,
    inputs: Inputs,
    runners: dict,
    records: list[InputRecord],
    count: int,
) -> list:
    """Original / perturbed image pairs for the report: robust inputs and refuted ones."""
    from verifier.check import build_region
    from verifier.plots import Example

    if count <= 0:
        return []
    pos_of = {int(i): p for p, i in enumerate(inputs.dataset.indices)}
    robust = [r for r in records if r.float and r.float.status != REFUTED and r.correct][:count]
    refuted = [r for r in records if r.float and r.float.status == REFUTED][:count]
    chosen = robust + refuted
    if not chosen:
        return []
    rng = np.random.default_rng(st.seed)
    points = []
    for rec in chosen:
        pos = pos_of[rec.index]
        region = build_region(st, inputs.x[pos], chain, rec.label, rec.index)
        if rec.float.status == REFUTED:
            coeffs = np.asarray(rec.float.coeffs)
        else:
            coeffs = random_point(region, rng)
        points.append(runtime_inputs(model, region, coeffs[None]))
    xp = np.concatenate(points)  # every example in one call per model
    float_labels = model.classify(xp)
    labels = {n: np.asarray(r.predict(xp)).argmax(axis=1) for n, r in runners.items()}
    image_shape = inputs.dataset.image_shape
    out = []
    for k, rec in enumerate(chosen):
        pos = pos_of[rec.index]
        out.append(
            Example(
                rec.index,
                from_layout(inputs.x[pos : pos + 1], model.layout, image_shape)[0],
                from_layout(xp[k : k + 1], model.layout, image_shape)[0],
                rec.label,
                int(float_labels[k]),
                {n: int(v[k]) for n, v in labels.items()},
            )
        )
    return out


def random_point(region: Region, rng: np.random.Generator) -> np.ndarray:
    """A point of the region reached by random single manipulations until the budget is spent."""
    s = np.zeros(region.num_generators, dtype=np.int64)
    for g in rng.permutation(region.num_generators):
        choices = [v for v in (region.lo[g], region.hi[g]) if v != 0]
        for v in choices[:1] if choices else []:
            trial = s.copy()
            trial[g] = v
            if region.contains(trial[None])[0]:
                s = trial
    return s
