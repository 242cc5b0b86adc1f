"""The error-model records: quantization grids, rounding events and what the runtime rounds
around each Affine layer, and the `ErrorModel` that bundles them with the runtime's chain.

Kept apart from the mappers (`quantize.error_model` for TFLite, `quantize.onnx_error_model` for
ONNX Runtime, `quantize.quant_chain` for lowering marked layers) so they import it, not each
other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from verifier.engine.bounds import PreparedChain
from verifier.engine.quantized_spec import output_lattice


@dataclass(frozen=True)
class Grid:
    """A fixed quantization grid: step `scale`, dequantized range [lo, hi]."""

    scale: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Event:
    """One rounding of a tensor v = gain * t + shift (per element t of an Affine layer's input
    or output, flat): to the fixed `grid` (in v's units; round to nearest, then clamp), or,
    with no grid, dynamically (asymmetric, `levels` steps over [min(v, 0), max(v, 0)] of the
    whole tensor, as ONNX Runtime's DynamicQuantizeLinear). `extra`: further error in steps."""

    gain: np.ndarray | float
    shift: np.ndarray | float
    grid: Grid | None
    levels: int = 255
    extra: float = 0.0

    @property
    def plain(self) -> bool:
        """v is t itself (gain 1, shift 0): the rounding is of the tensor's own values."""
        return bool(np.all(np.asarray(self.gain) == 1.0) and np.all(np.asarray(self.shift) == 0.0))


@dataclass(frozen=True)
class PairSums:
    """An integer kernel that adds u8 x s8 products in pairs into int16 with saturation
    (x86 AVX2 VPMADDUBSW, used by ONNX Runtime's u8s8 GEMM and convolution without VNNI).

    Per Affine output row j, |integer weight ji| = |W_ji| / (unit_j |gain_i|); the kernel's
    unsigned input is (gain_i t_i + shift_i) / grid.scale + offset (offset: the zero point, +128
    for an int8 input run as uint8); with no grid the input is quantized per run (dynamic).
    `adjacent`: the kernel pairs inputs 2m and 2m+1 of its own K order (`order`): MLAS packs a
    MatMul / Gemm's K in its input's order, and QLinearConv's window as (kh, kw, c) (both
    measured: tests/test_pair_sums.py); else any pairing is assumed."""

    unit: np.ndarray
    gain: np.ndarray | float
    shift: np.ndarray | float
    grid: Grid | None
    offset: float = 0.0
    adjacent: bool = False
    # with `adjacent`, the Affine input the kernel reads at each of its K positions, for every
    # output row (K,) or per row (rows, K): a Transpose / Reshape before a MatMul permutes them,
    # a convolution reads its window (None: the Affine's own order)
    order: np.ndarray | None = None
    # per output row, a bound on the loss once its constant part is in the layer's bias (a
    # region where every input's integer value is known: `verifier.engine.dynamic_input`)
    known: np.ndarray | None = None
    # +1 / -1 (for every row, or per row): only the pairs of integer weights of that sign are
    # charged (what each sign's loss moves the output by, one way:
    # `verifier.engine.quantized_spec.centre_pair_sums`)
    sign: int | np.ndarray = 0
    # the kernel takes its input as uint8, as the graph onnxruntime runs shows (a run-time
    # quantized input always): its loss is then the modelled one exactly
    # (`verifier.engine.dynamic_input.fold_pair_sums` may fold it); an int8 input (zero point
    # -128) may be run by kernels that saturate nothing, so only the two-sided bound holds
    unsigned: bool = False


@dataclass(frozen=True)
class Rounding:
    """What the runtime rounds around one Affine layer besides float32 arithmetic."""

    dynamic_input: bool = False  # the input row is quantized to int8 at run time (hybrid)
    symmetric_input: bool = False  # ... possibly symmetric (the file's kernel option)
    input_grid: Grid | None = None  # the input is quantized to this fixed grid (model input)
    output_grid: Grid | None = None  # the output is requantized to this grid, then clamped
    multiplier: float = 0.0  # largest requantization multiplier s_in * s_w / s_out
    inputs: tuple = ()  # further Events on the input, in order (after input_grid)
    outputs: tuple = ()  # further Events on the output, in order (before output_grid)
    pairs: PairSums | None = None  # int16 pair sums that may saturate in the accumulation
    # the accumulation is exact (integer inputs and weights): float32 only scales it (and adds
    # a float bias, hybrid) or requantizes it
    integer: bool = False


# What the logits' common grid changes in a decision (`quantized_spec.decision_thresholds`).
TIES_HOW = (
    "the logits on one grid, a tie goes to the lower class: a margin against a later class "
    "need only exceed minus one step"
)


@dataclass(frozen=True)
class ErrorModel:
    """The runtime's chain (weights from its file) and the rounding of each of its layers."""

    chain: PreparedChain
    rounding: list  # per layer: Rounding for Affine layers, None for Relu / MaxPool
    source: str  # what was mapped, e.g. "litert dynamic range (hybrid int8)"
    how: str = ""  # one line: how the runtime's rounding is modelled (for the report)

    def describe(self) -> dict[str, Any]:
        """A short record for run metadata."""
        kinds = [_kind(r) for r in self.rounding if r is not None]
        grids = output_lattice(self)
        how = self.how
        if grids is not None and grids[-1] is not None:
            how += f"; {TIES_HOW}" if how else TIES_HOW
        return {
            "error_model": True,
            "source": self.source,
            "affine_layers": kinds,
            "how": how,
        }


def _kind(r: Rounding) -> str:
    """What one Affine layer's rounding is, for reports; with its kernel's int16 pair sums
    (`PairSums`) where it has them."""
    if r.dynamic_input or any(e.grid is None for e in r.inputs):
        kind = "dynamic int8 input"
    elif r.output_grid is not None or any(e.grid is not None for e in r.outputs):
        kind = "static int8"
    elif any(e.grid is not None for e in r.inputs):
        kind = "quantized input"
    else:
        kind = "float32"
    if r.pairs is not None:
        kind += " with int16 pair sums" + (" (uint8 kernel)" if r.pairs.unsigned else "")
    return kind
