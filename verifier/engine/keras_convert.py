"""Keras model files (`.keras`, `.h5`) to ONNX, so the rest of the tool reads one format.

TensorFlow and tf2onnx are imported inside the functions: importing TensorFlow takes seconds and
only this conversion needs it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verifier.errors import InputError

if TYPE_CHECKING:
    import keras

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# names tf2onnx makes up end in a counter: "const_axes__17", "Transpose__28:0", "a/Reshape__25"
COUNTED_NAME = re.compile(r"(.*?)__(\d+)(:\d+)?")


def _quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ start-up log lines unless the user chose otherwise.

    TF 2.21 prints its oneDNN notice whatever TF_CPP_MIN_LOG_LEVEL says; turning oneDNN off is
    the only switch, and conversion only traces the model, so it computes nothing with it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def keras_to_onnx(model: keras.Model, path: Path, opset: int = 17) -> Path:
    """Convert an in-memory Keras model to ONNX at `path` (written atomically); return `path`.

    The graph has one float32 input "input" of shape (batch, *model.input_shape[1:]) and one
    output "logits".
    """
    _quiet_tensorflow()
    import tensorflow as tf
    import tf2onnx

    path = Path(path)
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def forward(x: Any) -> Any:
        return model(x, training=False)

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    _rename_single_output(proto, OUTPUT_NAME)
    _canonical_names(proto.graph)
    # tf2onnx's default names the traced function, whose number depends on earlier TF activity
    proto.graph.doc_string = f"converted from Keras model {model.name!r} by tf2onnx"
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            dims[0].dim_param = "batch"  # tf2onnx writes an arbitrary "unk__N"
    _write_atomic(path, proto.SerializeToString())
    return path


def _rename_single_output(proto: Any, name: str) -> None:
    """Rename the graph's only output to `name` (tf2onnx names it after a TF tensor)."""
    graph = proto.graph
    if len(graph.output) != 1 or graph.output[0].name == name:
        return
    taken = {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {v.name for v in graph.input} | {t.name for t in graph.initializer}
    if name in taken:
        return
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [name if v == old else v for v in node.output]
        node.input[:] = [name if v == old else v for v in node.input]
    graph.output[0].name = name


def _canonical_names(graph: Any) -> None:
    """Renumber tf2onnx's made-up names in graph order, so one model always gives one file.

    tf2onnx suffixes the names it invents with a global counter ("Transpose__28:0") whose values
    vary run to run, and when it merges equal constants it keeps an arbitrary one of them; so
    counters are renumbered by first use and invented constant names become "const__N".
    """
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        return  # subgraphs may refer to outer names; leave such graphs alone
    first_use: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            first_use.setdefault(name, len(first_use))
    inits = sorted(graph.initializer, key=lambda t: first_use.get(t.name, len(first_use)))
    init_names = {t.name for t in inits}

    numbers: dict[str, int] = {}
    rename: dict[str, str] = {}

    def visit(name: str) -> None:
        match = COUNTED_NAME.fullmatch(name)
        if name in rename or not match:
            return
        base, counter, port = match.groups()
        number = numbers.setdefault(counter, len(numbers))
        if name in init_names and "/" not in base:
            base = "const"  # which of several merged constants survived is arbitrary
        rename[name] = f"{base}__{number}{port or ''}"

    for node in graph.node:
        visit(node.name)
        for name in (*node.input, *node.output):
            visit(name)
    for name in (*(t.name for t in inits), *(v.name for v in graph.value_info)):
        visit(name)
    tensors = {v for n in graph.node for v in (*n.input, *n.output)} | init_names
    tensors |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    nodes = [n.name for n in graph.node]
    if len({rename.get(v, v) for v in tensors}) != len(tensors) or len(
        {rename.get(v, v) for v in nodes}
    ) != len(set(nodes)):
        return  # a renamed name would collide with another; keep tf2onnx's names

    for node in graph.node:
        node.name = rename.get(node.name, node.name)
        node.input[:] = [rename.get(v, v) for v in node.input]
        node.output[:] = [rename.get(v, v) for v in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = rename.get(value.name, value.name)
    copies = [type(t)() for t in inits]
    for copy, tensor in zip(copies, inits, strict=True):
        copy.CopyFrom(tensor)
        copy.name = rename.get(tensor.name, tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(copies)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp's 0600, the umask sets the permissions
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_format(src: Path, raw: bytes) -> None:
    """Reject files that cannot be a Keras model before paying for the TensorFlow import."""
    suffix = src.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(io.BytesIO(raw)):
            raise InputError(
                f"{src} is not a Keras model file: a .keras file is a zip archive and this is not"
            )
    elif suffix in (".h5", ".hdf5"):
        # the HDF5 signature sits at offset 0, 512, 1024, 2048, ... (after a user block)
        offsets = [0] + [512 << i for i in range(20) if (512 << i) < len(raw)]
        if not any(raw[o : o + 8] == HDF5_SIGNATURE for o in offsets):
            raise InputError(f"{src} is not a Keras model file: no HDF5 signature")
    else:
        raise InputError(
            f"{src}: unsupported Keras model file type {src.suffix!r}; expected .keras or .h5"
        )


def convert_keras_file(src: Path, cache_dir: Path) -> Path:
    """Convert a `.keras` / `.h5` file to ONNX once, cached by content hash in `cache_dir`."""
    src = Path(src)
    try:
        raw = src.read_bytes()
    except FileNotFoundError:
        raise InputError(f"Keras model file not found: {src}") from None
    except OSError as exc:
        raise InputError(f"cannot read Keras model file {src}: {exc}") from None
    _check_format(src, raw)
    digest = hashlib.sha256(raw).hexdigest()[:12]
    out = Path(cache_dir) / f"{src.stem}-{digest}.onnx"
    if out.is_file():
        return out

    _quiet_tensorflow()
    import keras

    try:
        model = keras.models.load_model(src, compile=False)
    except Exception as exc:  # Keras raises many types (ValueError, OSError, zipfile, h5py)
        raise InputError(
            f"cannot load Keras model file {src}: {type(exc).__name__}: {exc}".rstrip()
        ) from None
    if not isinstance(model.input_shape, tuple) or not model.input_shape:
        raise InputError(
            f"Keras model {src} must have exactly one input; it has input shape {model.input_shape}"
        )
    try:
        return keras_to_onnx(model, out)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cannot convert Keras model {src} to ONNX: {type(exc).__name__}: {exc}"
        ) from None
