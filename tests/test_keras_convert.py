"""Keras file -> ONNX conversion: same outputs as Keras, cached once, clear errors on bad files."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import verifier.engine.keras_convert as kc
from verifier.engine.keras_convert import convert_keras_file
from verifier.errors import InputError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny saved Keras model (4 inputs -> Dense 5 ReLU -> Dense 3) and the model itself."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    path = tmp_path_factory.mktemp("keras") / "tiny.keras"
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def converted(
    keras_file: tuple[Path, object], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The ONNX file of `keras_file` and its cache directory."""
    cache = tmp_path_factory.mktemp("cache")
    return convert_keras_file(keras_file[0], cache), cache


def test_onnx_matches_keras(keras_file: tuple[Path, object], converted: tuple[Path, Path]) -> None:
    src, model = keras_file
    out, cache = converted
    assert out.parent == cache and out.name.startswith("tiny-") and out.suffix == ".onnx"
    graph = onnx.load(out).graph
    assert [v.name for v in graph.input] == ["input"]
    assert [v.name for v in graph.output] == ["logits"]
    x = np.random.default_rng(1).uniform(-2, 2, size=(32, 4)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    want = model.predict(x, verbose=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_second_call_reuses_cache(
    keras_file: tuple[Path, object], converted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache = converted
    before = out.stat()

    def no_conversion(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached ONNX file should have been reused")

    monkeypatch.setattr(kc, "keras_to_onnx", no_conversion)
    again = convert_keras_file(keras_file[0], cache)
    assert again == out
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert sorted(p.name for p in cache.iterdir()) == [out.name]


def test_conversion_is_byte_reproducible(keras_file: tuple[Path, object], tmp_path: Path) -> None:
    # tf2onnx numbers invented names with a process-wide counter; the files must not depend on it
    first = kc.keras_to_onnx(keras_file[1], tmp_path / "a.onnx").read_bytes()
    second = kc.keras_to_onnx(keras_file[1], tmp_path / "b.onnx").read_bytes()
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temp files


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_random_bytes_raise_input_error(tmp_path: Path, suffix: str) -> None:
    bad = tmp_path / f"corrupt{suffix}"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="corrupt"):
        convert_keras_file(bad, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_zip_that_is_not_a_keras_model_raises_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "notamodel.keras"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("config.json", "{not json")
    with pytest.raises(InputError, match="notamodel.keras"):
        convert_keras_file(bad, tmp_path / "cache")


def test_missing_file_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found.*missing.keras"):
        convert_keras_file(tmp_path / "missing.keras", tmp_path / "cache")
