"""Exports of an FCN at a finer stride: the rarefied network (dilated poolings, dilated convolutions, the strided
slice of a thinned map) written in every format and checked against Keras like any export.

The network: a strided convolution, then a max and an average pooling, so that at stride 1 both poolings are
`DilatedMaxPooling2D`/`DilatedAveragePooling2D`; at stride 3 (not dividing 8) it is the stride-1 map with every
third cell kept. Each export is loaded in a fresh process without this package and compared at two sizes.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.dilated_pooling import DilatedAveragePooling2D, DilatedMaxPooling2D
from keras_fcn_surgery.surgery.atrous import at_stride, rarefy

FORMATS = [
    pytest.param("onnx", marks=()),
    pytest.param("openvino", marks=()),
    pytest.param("savedmodel", marks=pytest.mark.heavy),
    pytest.param("tflite", marks=pytest.mark.heavy),
    pytest.param("torch", marks=pytest.mark.heavy),
]
PACKAGES = {"onnx": ("onnxruntime", "tf2onnx"), "openvino": ("openvino",), "torch": ("torch",)}
PATHS = {"onnx": "m.onnx", "openvino": "ir", "savedmodel": "sm", "tflite": "m.tflite", "torch": "m.pt2"}


def _pooled_classifier():
    keras.utils.set_random_seed(21)
    inputs = keras.Input((20, 20, 3))
    x = layers.Conv2D(5, 3, strides=2, activation="relu")(inputs)  # 9
    x = layers.MaxPooling2D(2)(x)  # 4
    x = layers.Conv2D(6, 1, activation="relu")(x)
    x = layers.AveragePooling2D(2)(x)  # 2
    x = layers.Conv2D(4, 2, activation="relu")(x)  # 1
    return keras.Model(inputs, layers.Dense(3)(layers.Flatten()(x)), name="pooled_net")


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("format", FORMATS)
def test_an_fcn_at_a_finer_stride_exports_and_checks_in_every_format(tmp_path, format, stride):
    for package in PACKAGES.get(format, ()):
        pytest.importorskip(package)
    classifier = _pooled_classifier()
    fcn = kfs.convert(classifier)
    assert kfs.geometry(fcn).stride == (8, 8)
    finer = at_stride(fcn, stride)
    poolings = {type(layer) for layer in rarefy(fcn, 1).layers}
    assert {DilatedMaxPooling2D, DilatedAveragePooling2D} <= poolings
    result = kfs.export(finer, tmp_path / PATHS[format], format=format, options=kfs.ExportOptions(convert=False))
    assert len(result.checks) == 2 and all(check.passed for check in result.checks)
    sizes = [check.input_shape[1:3] for check in result.checks]
    assert all(kfs.geometry(finer).output_size(size)[0] >= 1 for size in sizes)
    # The larger check size has several cells at stride s: the export computes the finer map, not the FCN's.
    assert kfs.geometry(finer).output_size(sizes[1])[0] > kfs.geometry(fcn).output_size(sizes[1])[0]


def test_a_rarefied_fcn_round_trips_through_a_keras_file(tmp_path):
    fcn = kfs.convert(_pooled_classifier())
    image = np.random.default_rng(22).random((1, 37, 33, 3), dtype=np.float32)
    for stride in (1, 3):
        finer = at_stride(fcn, stride)
        finer.save(tmp_path / f"at{stride}.keras")
        loaded = keras.models.load_model(tmp_path / f"at{stride}.keras")
        np.testing.assert_array_equal(loaded.predict(image, verbose=0), finer.predict(image, verbose=0))
        assert kfs.geometry(loaded).stride == (stride, stride)


def test_the_export_command_writes_the_fcn_at_a_finer_stride(tmp_path, capsys):
    for package in PACKAGES["onnx"]:
        pytest.importorskip(package)
    import onnxruntime

    from keras_fcn_surgery import cli

    classifier = _pooled_classifier()
    classifier.save(tmp_path / "pooled.keras")
    written = tmp_path / "at2.onnx"
    args = ["export", str(tmp_path / "pooled.keras"), str(written), "--format", "onnx", "--stride", "2"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count(": equal") == 2  # checked at two sizes
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(23).random((1, 37, 33, 3), dtype=np.float32)
    scores = session.run(None, {session.get_inputs()[0].name: image})[0]
    expected = rarefy(kfs.convert(classifier), 2).predict(image, verbose=0)
    assert scores.shape == expected.shape and kfs.geometry(rarefy(kfs.convert(classifier), 2)).stride == (2, 2)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    refused = ["export", str(tmp_path / "pooled.keras"), str(tmp_path / "at16.onnx"), "--format", "onnx"]
    assert cli.main([*refused, "--stride", "16"]) == 2  # a multiple of the FCN's stride: no FCN map there
    assert "16x16" in capsys.readouterr().err and not (tmp_path / "at16.onnx").exists()
