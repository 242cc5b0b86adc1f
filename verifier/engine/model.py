"""The float model: an ONNX file run by onnxruntime behind a batched `predict(x) -> logits`.

Keras files are converted to ONNX once (cached next to the run's outputs) so the float model
that is verified is the exact graph that is quantized. The input layout (flat, NCHW, NHWC) is
read from the graph; `--layout` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from verifier.engine.data import LAYOUTS
from verifier.engine.model_files import model_sha256
from verifier.engine.network import Network
from verifier.engine.onnx_import import _first_line, _graph_inputs, import_network, read_onnx
from verifier.errors import InputError, UnsupportedModelError

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass
class Model:
    """A float classifier on onnxruntime: `predict` maps (N, *input_shape) in [0,1] to logits."""

    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    layout: str
    num_classes: int
    fixed_batch: int | None = None  # the graph's batch size when it is not dynamic
    source: Path | None = None  # the user's file when it was converted (Keras)
    _session: object = field(default=None, repr=False)

    def predict(self, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Logits (N, classes) as float32, batched; `x` is in the model's layout."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"input shape {tuple(x.shape[1:])} does not match the model's {self.input_shape}"
            )
        step = self.fixed_batch or batch_size
        outs = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            pad = step - len(chunk) if self.fixed_batch else 0
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *self.input_shape), np.float32)])
            try:
                out = self._session.run(None, {self.input_name: chunk})[0]  # type: ignore[attr-defined]
            except Exception as exc:  # onnxruntime's own exception types: a graph that cannot run
                raise InputError(
                    f"onnxruntime cannot run {self.path}: {_first_line(exc)}"
                ) from None
            outs.append(out.reshape(len(chunk), -1)[: len(chunk) - pad])
        if not outs:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    def classify(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels (argmax of the logits; ties go to the lowest label)."""
        return self.predict(x).argmax(axis=1)

    @cached_property
    def network(self) -> Network:
        """The layer list the engine verifies, imported from the same ONNX file."""
        return import_network(read_onnx(self.path))

    @cached_property
    def sha256(self) -> str:
        """The model's identity: graph and external data (`verifier.engine.model_files`)."""
        return model_sha256(self.path)


def detect_layout(shape: tuple[int, ...]) -> str | None:
    """`flat`, `nchw` or `nhwc` from a per-sample input shape (channels are the smaller end)."""
    if len(shape) == 1:
        return "flat"
    if len(shape) != 3 or shape[0] == shape[2]:
        return None
    return "nchw" if shape[0] < shape[2] else "nhwc"


def load_model(
    path: str | Path,
    layout: str | None = None,
    cache_dir: Path | None = None,
    num_threads: int | None = None,
) -> Model:
    """Load an ONNX or Keras model file into a `Model` (Keras converted and cached as ONNX);
    `num_threads`: onnxruntime's intra-op threads (default: its own choice, every core)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    source = None
    if path.suffix.lower() in KERAS_SUFFIXES:
        from verifier.engine.keras_convert import convert_keras_file

        source, path = path, convert_keras_file(path, cache_dir or path.parent)
    elif path.suffix.lower() != ".onnx":
        raise InputError(
            f"{path}: unsupported model format {path.suffix!r}; use .onnx or .keras/.h5"
        )
    model = read_onnx(path)
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise UnsupportedModelError(f"{path}: expected one input, the graph has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2:
        raise UnsupportedModelError(f"{path}: input {inputs[0].name!r} has no batch axis")
    per_sample = tuple(d.dim_value for d in dims[1:])
    if any(d <= 0 for d in per_sample):
        raise UnsupportedModelError(
            f"{path}: input {inputs[0].name!r} has dynamic sizes beyond the batch axis "
            f"({[d.dim_param or d.dim_value for d in dims]}); export it with a fixed image size"
        )
    fixed_batch = dims[0].dim_value if dims[0].dim_value > 0 else None
    if layout is None:
        layout = detect_layout(per_sample)
        if layout is None:
            raise InputError(
                f"{path}: cannot tell the layout of input shape {per_sample}; pass --layout "
                f"({', '.join(LAYOUTS)})"
            )
    elif layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = num_threads or 0
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime's own exception types
        raise InputError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None
    out_dims = session.get_outputs()[0].shape
    classes = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else None
    m = Model(path, inputs[0].name, per_sample, layout, 0, fixed_batch, source, session)
    if classes is None:
        classes = m.predict(np.zeros((1, *per_sample), np.float32)).shape[1]
    m.num_classes = int(classes)
    return m
