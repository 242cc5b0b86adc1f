"""The evidence a report pictures: example images (robust inputs with a random point of their
region, refuted inputs with their counterexample, every model's answer on the perturbed image)
and the ladders of refuted inputs with every model's margin at each rung (SPEC section 2)."""

from __future__ import annotations

import numpy as np

from verifier.engine.data import from_layout
from verifier.engine.model import Model
from verifier.engine.points import runtime_inputs
from verifier.engine.regions import Region
from verifier.engine.result import REFUTED
from verifier.run.config import Settings
from verifier.run.inputs import Inputs
from verifier.run.records import FLOAT, InputRecord


class Regions:
    """The regions of a setting's inputs, built on first use (the report's images and ladders
    ask for the same ones)."""

    def __init__(self, st: Settings, chain, inputs: Inputs) -> None:
        self.st, self.chain, self.inputs = st, chain, inputs
        self.pos = {int(i): p for p, i in enumerate(inputs.dataset.indices)}
        self._cache: dict[int, Region] = {}

    def __call__(self, rec: InputRecord) -> Region:
        from verifier.run.check import build_region

        if rec.index not in self._cache:
            x = self.inputs.x[self.pos[rec.index]]
            self._cache[rec.index] = build_region(self.st, x, self.chain, rec.label, rec.index)
        return self._cache[rec.index]


def refuted_ladders(
    regions: Regions, model: Model, runners: dict, records: list[InputRecord]
) -> list:
    """Per refuted input, the ladder from x to its counterexample with the float model's and
    every quantized model's margin at each rung (`ladders.MarginLadder`); in MCTS mode also
    the ladders to the IP / EP points the search explored (kept in the record's detail), for
    every input it searched."""
    from verifier.engine.ladders import margin_ladders

    cases = []
    for rec in records:
        if rec.float is None:
            continue
        ends, kinds = [], []
        if rec.float.status == REFUTED and rec.float.coeffs is not None:
            ends, kinds = [rec.float.coeffs], ["counterexample"]
        for kind, key in (("effective", "explored_ep"), ("ineffective", "explored_ip")):
            found = rec.float.detail.get(key, [])
            ends += found
            kinds += [kind] * len(found)
        if ends:
            cases.append((rec.index, rec.label, regions(rec), np.asarray(ends), kinds))
    return margin_ladders(cases, {FLOAT: model, **runners})


def report_examples(
    regions: Regions,
    model: Model,
    runners: dict,
    records: list[InputRecord],
    count: int,
) -> list:
    """Original / perturbed image pairs for the report: robust inputs and refuted ones."""
    from verifier.outputs.plots import Example

    if count <= 0:
        return []
    inputs, pos_of = regions.inputs, regions.pos
    robust = [r for r in records if r.float and r.float.status != REFUTED and r.correct][:count]
    refuted = [r for r in records if r.float and r.float.status == REFUTED][:count]
    chosen = robust + refuted
    if not chosen:
        return []
    rng = np.random.default_rng(regions.st.seed)
    points = []
    for rec in chosen:
        region = regions(rec)
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
