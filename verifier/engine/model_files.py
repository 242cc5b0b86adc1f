"""A model's files on disk: the graph, and the external data files its ONNX tensors point to.

Exporters (PyTorch's since 2.9 by default) write the weights next to the graph
(`model.onnx` + `model.onnx.data`, or one file per tensor, or in a sub-folder). Every place that
opens, hashes, copies or describes a model goes through here, so the weights always come along.
External data is checked before anything reads it: every location must stay inside the model's
folder (no `..`, no absolute path, no symlink out of it) and every file must hold the bytes its
tensors declare; a violation is an InputError naming the file.

The model's identity (`model_sha256`): a file without external data hashes to the SHA-256 of its
bytes (what `sha256sum` prints); a model with external data to the SHA-256 of a manifest with one
line per file, `<sha256 of its bytes>  <name>\\n`, first the graph file named `graph`, then each
external data file named by its location as the graph writes it, in sorted order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from verifier.errors import InputError


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (model files, quantized files, results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Element types packed several to a byte in raw data (bits per element).
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}


@dataclass(frozen=True)
class ExternalFile:
    """One external data file of a model: its location as the graph writes it, and its path."""

    location: str
    path: Path
    size: int


def parse_graph(path: str | Path) -> onnx.ModelProto:
    """The ONNX graph of `path` without its external data; corrupt bytes are an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path} is not a valid ONNX file: {first}") from None


def external_files(path: str | Path, proto: onnx.ModelProto | None = None) -> list[ExternalFile]:
    """The checked external data files of the ONNX model at `path`, sorted by location.

    `proto` is the graph when the caller has parsed it already (without its external data).
    Files other than `.onnx` have none.
    """
    path = Path(path)
    if proto is None:
        if path.suffix.lower() != ".onnx":
            return []
        proto = parse_graph(path)
    folder = path.parent.resolve()
    found: dict[str, ExternalFile] = {}
    for tensor in _all_tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        loc = info.location
        if loc not in found:
            found[loc] = _checked_file(path, folder, loc, tensor.name)
        _check_extent(path, found[loc], tensor, info)
    return [found[k] for k in sorted(found)]


def _checked_file(model: Path, folder: Path, loc: str, tensor: str) -> ExternalFile:
    """The file at location `loc`, refused when outside the model's folder or not a file."""
    where = f"{model}: external data {loc!r} of tensor {tensor!r}"
    if not loc:
        raise InputError(f"{where} names no file")
    pure = PurePosixPath(loc.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(loc).drive or ".." in pure.parts:
        raise InputError(f"{where} is outside the model's folder {folder}")
    target = model.parent / pure
    if not target.resolve().is_relative_to(folder):
        raise InputError(f"{where} points outside the model's folder {folder} (a symlink)")
    if not target.exists():
        raise InputError(f"{where}: file {target} not found")
    if not target.is_file():
        raise InputError(f"{where}: {target} is not a regular file")
    return ExternalFile(loc, target, target.stat().st_size)


def _check_extent(
    model: Path, f: ExternalFile, tensor: TensorProto, info: ExternalDataInfo
) -> None:
    """Refuse a file too short for a tensor's bytes, or a declared length its shape contradicts."""
    need = tensor_bytes(tensor)
    offset, length = int(info.offset or 0), info.length or need
    if need is not None and info.length and info.length != need:
        raise InputError(
            f"{model}: tensor {tensor.name!r} in {f.path} is declared {info.length} bytes, "
            f"its shape and type need {need}"
        )
    end = offset + int(length or 0)
    if end > f.size:
        raise InputError(
            f"{model}: external data file {f.path} is truncated: tensor {tensor.name!r} needs "
            f"bytes {offset}..{end}, the file has {f.size}"
        )


def tensor_bytes(tensor: TensorProto) -> int | None:
    """The raw byte size of a tensor from its shape and type (None for strings and unknowns)."""
    count = int(np.prod(np.asarray(tensor.dims, dtype=np.float64)))
    bits = _PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        return -(-count * bits // 8)
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return count * item


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor of a graph that can hold external data: initializers and attribute tensors,
    in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def load_external_data(proto: onnx.ModelProto, path: str | Path) -> list[ExternalFile]:
    """Check, then read into `proto`, the external data of the graph parsed from `path`."""
    files = external_files(path, proto)
    if files:
        try:
            onnx.load_external_data_for_model(proto, str(Path(path).parent))
        except Exception as exc:  # onnx's own path checks, I/O errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{path}: cannot read its external data: {first}") from None
    return files


def model_sha256(path: str | Path) -> str:
    """The model's identity over the graph and every external data file (module docstring)."""
    return _identity(Path(path), external_files(path))


def _identity(path: Path, files: list[ExternalFile]) -> str:
    if not files:
        return sha256_file(path)
    lines = [f"{sha256_file(path)}  graph\n"]
    lines += [f"{sha256_file(f.path)}  {f.location}\n" for f in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def describe_files(path: str | Path) -> dict:
    """The model's hash, total size in bytes, and its external data files (location, bytes)."""
    path = Path(path)
    files = external_files(path)
    return {
        "sha256": _identity(path, files),
        "bytes": path.stat().st_size + sum(f.size for f in files),
        "external_data": [{"location": f.location, "bytes": f.size} for f in files],
    }
