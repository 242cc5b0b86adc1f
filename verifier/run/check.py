"""One input, all models: build its region, decide it on the float model, then on each
quantized model (exact relative robustness on R, transfer of the counterexample on R_NOT).

`Checker` holds what every input needs (model, chain, runners, settings); `check` is a pure
function of the input's position, so any number of worker processes give the same records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from verifier.engine.bounds import prepare_chain
from verifier.engine.enumeration import replay
from verifier.engine.features import select_positions
from verifier.engine.regions import FAMILIES, Region
from verifier.engine.result import CERTIFIED, NOT_REFUTED, REFUTED, Decision
from verifier.run.config import Settings
from verifier.run.records import InputRecord, Outcome

# MCTS mode: explored IP / EP points kept per input for the ladder graph
EXPLORED_KEPT = 32


@dataclass
class Checker:
    """Everything needed to check one input; built once per process."""

    settings: Settings
    model: object  # verifier.engine.model.Model (runtime of the float model)
    chain: list
    x: np.ndarray  # (N, *input_shape) float32
    y: np.ndarray
    indices: np.ndarray  # dataset positions, for records and seeds
    pred: np.ndarray  # float clean predictions
    runners: dict = field(default_factory=dict)  # name -> runner
    qpred: dict = field(default_factory=dict)  # name -> clean predictions
    # name -> quantize.error_model.ErrorModel (built once, see `quantized.runner_error_models`);
    # a runner missing here gets no bounds
    error_models: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.chain = prepare_chain(self.chain)  # once per checker, not once per decision
        one_blas_thread()

    def region(self, pos: int) -> Region:
        """The region around input `pos`."""
        return build_region(
            self.settings, self.x[pos], self.chain, int(self.y[pos]), int(self.indices[pos])
        )

    def check(self, pos: int) -> InputRecord:
        """The record of input `pos`: float decision, then every quantized model."""
        index, label, pred = int(self.indices[pos]), int(self.y[pos]), int(self.pred[pos])
        qpred = {k: int(v[pos]) for k, v in self.qpred.items()}
        rec = InputRecord(index, label, pred, quantized_pred=qpred)
        if pred != label:
            return rec
        region = self.region(pos)
        seed = self.settings.seed + index
        if self.settings.search == "mcts":
            return self._check_mcts(rec, region, seed)
        decision = self._decide_float(region, label, seed)
        rec.float = outcome(decision)
        for name, runner in self.runners.items():
            if decision.status == CERTIFIED:
                rec.quantized[name] = outcome(
                    self._decide_quantized(runner, region, label, seed, decision, name)
                )
            elif decision.status == REFUTED:
                rec.quantized[name] = transfer_outcome(runner, region, decision, label)
        return rec

    def _decide_float(self, region: Region, label: int, seed: int):
        """The float model on the region, its closed leaves kept for the quantized decisions."""
        from verifier.engine.decide import decide

        s = self.settings
        return decide(
            self.model,
            self.chain,
            region,
            label,
            timeout=s.timeout,
            max_nodes=s.max_nodes,
            enum_limit=s.enum_limit,
            use_smt=s.use_smt,
            seed=seed,
            keep_leaves=True,
        )

    def _decide_quantized(self, runner, region: Region, label: int, seed: int, decision, name):
        """A quantized model on a region the float model certified: from the float proof
        (`verifier.engine.diffdecide`), with the runner's error model when it has one."""
        from verifier.engine.diffdecide import decide_from_float

        s = self.settings
        return decide_from_float(
            runner,
            self.chain,
            region,
            label,
            decision.detail.get("reuse"),
            self.error_models.get(name),
            timeout=s.quantized_budget,
            max_nodes=s.max_nodes,
            enum_limit=s.quantized_enum_limit,
            seed=seed,
        )

    def _check_mcts(self, rec: InputRecord, region: Region, seed: int) -> InputRecord:
        """The paper's mode: search on the float model, replay its IP / EP sets on each model."""
        from verifier.engine.search import mcts_search

        s = self.settings
        res = mcts_search(
            self.model, region, rec.label, rollouts=s.rollouts, time_budget=s.timeout, seed=seed
        )
        rec.float = outcome(res.decision)
        rec.float.detail.update(explored(res))
        for name, runner in self.runners.items():
            rec.quantized[name] = replay_outcome(runner, region, res, rec.label)
        return rec


def one_blas_thread() -> None:
    """Limit this process's BLAS to one thread (it stays so): the engine's products are
    small, and BLAS threads contend with the runtimes' threads for the same cores. With
    OpenBLAS on two threads beside onnxruntime's pool, a branch-and-bound node took twice as
    long on a 2-core machine (MNIST MLP, features r=20: 42.2 s against 21.3 s for three inputs)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def build_region(s: Settings, x: np.ndarray, chain: list, label: int, index: int) -> Region:
    """The region around one input; feature selection is per input (seeded by its index)."""
    x = np.asarray(x).reshape(-1)
    layers = getattr(chain, "layers", chain)  # a PreparedChain or the lowered list
    order = select_positions(s.selection, x, chain=layers, label=label, seed=s.seed + index)
    return FAMILIES[s.region].build(x, order, s.step, s.radius, s.dims, s.feature_dims)


def outcome(d: Decision) -> Outcome:
    """A decision as a record outcome (coefficients as a plain list)."""
    coeffs = None if d.coeffs is None else [int(v) for v in np.asarray(d.coeffs).reshape(-1)]
    detail = {k: v for k, v in d.detail.items() if isinstance(v, (int, float, str, bool))}
    return Outcome(
        d.status, d.route, round(d.seconds, 6), int(d.nodes), coeffs, d.adv_label, detail=detail
    )


def explored(res, limit: int = EXPLORED_KEPT) -> dict:
    """The first `limit` EP and IP points an MCTS search evaluated (coefficient lists), kept
    with the record so the report's ladder graph can show them (SPEC section 2)."""
    return {
        "explored_ep": [[int(v) for v in p] for p in res.ep[:limit]],
        "explored_ip": [[int(v) for v in p] for p in res.ip[:limit]],
    }


def transfer_outcome(runner, region: Region, d: Decision, label: int) -> Outcome:
    """Replay the float model's confirmed counterexample on a quantized runner."""
    wrong, labels = replay(runner, region, np.asarray(d.coeffs)[None], label)
    fooled = bool(wrong[0])
    return Outcome(
        REFUTED if fooled else NOT_REFUTED,
        "replay",
        coeffs=[int(v) for v in d.coeffs] if fooled else None,
        adv_label=int(labels[0]) if fooled else None,
        transfer=fooled,
        transfer_label=int(labels[0]),
        ep_replayed=1,
        ep_transferred=int(fooled),
    )


def replay_outcome(runner, region: Region, res, label: int) -> Outcome:
    """MCTS mode: replay the recorded IP (robust inputs) or EP (refuted inputs) on a runner."""
    if res.decision.status == REFUTED:
        out = transfer_outcome(runner, region, res.decision, label)
        if len(res.ep):
            wrong, _ = replay(runner, region, res.ep, label)
            out.ep_replayed, out.ep_transferred = len(res.ep), int(wrong.sum())
        return out
    wrong, labels = replay(runner, region, res.ip, label)
    bad = np.flatnonzero(wrong)
    if len(bad):
        first = bad[0]
        return Outcome(
            REFUTED,
            "replay",
            coeffs=[int(v) for v in res.ip[first]],
            adv_label=int(labels[first]),
            ip_replayed=len(res.ip),
            ip_misclassified=len(bad),
        )
    return Outcome(NOT_REFUTED, "replay", ip_replayed=len(res.ip))
