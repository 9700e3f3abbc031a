"""ONNX export: symbolic batch, height and width; onnxruntime agrees with Keras at two sizes."""

import os

import keras
import numpy as np
import pytest
from conftest import random_images
from models import small_flatten_cnn, valid_gap_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.exporting import onnx as onnx_export
from keras_fcn_surgery.exporting import pipeline as export_common

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_onnx_equals_keras_at_two_sizes_with_symbolic_height_and_width(tmp_path):
    source = small_flatten_cnn()
    fcn = kfs.convert(source)
    path = tmp_path / "fcn.onnx"

    result = kfs.export_onnx(fcn, path, options=kfs.ExportOptions(input_size=(32, 32)))

    assert result.path == str(path) and len(result.checks) == 2
    proto = onnx.load(str(path))
    assert [value.name for value in proto.graph.input] == ["images"]
    assert [value.name for value in proto.graph.output] == ["scores"]
    assert dims(proto.graph.input[0]) == ["batch", "height", "width", 3]
    assert dims(proto.graph.output[0]) == ["batch", "map_height", "map_width", 5]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 32, 32, 3), (1, 71, 53, 3)):
        image = random_images(shape, seed=shape[1])
        (scores,) = session.run(["scores"], {"images": image})
        expected = np.asarray(fcn(image))
        assert scores.shape == expected.shape
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    small = session.run(["scores"], {"images": random_images((2, 32, 32, 3), seed=32)})[0]
    np.testing.assert_allclose(small[:, 0, 0, :], np.asarray(source(random_images((2, 32, 32, 3), seed=32))), atol=1e-6)


def test_global_pooling_head_and_channels_first_layout(tmp_path):
    source = valid_gap_cnn()
    result = kfs.export_onnx(source, tmp_path / "gap.onnx", options=kfs.ExportOptions(head="dense"))
    assert [check.input_shape for check in result.checks][0] == (2, 24, 24, 3)

    channels_first = small_flatten_cnn(data_format="channels_first")
    path = tmp_path / "cf.onnx"
    kfs.export_onnx(channels_first, path)
    proto = onnx.load(str(path))
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = random_images((1, 3, 32, 32))
    (scores,) = session.run(["scores"], {"images": image})
    np.testing.assert_allclose(scores[:, :, 0, 0], np.asarray(channels_first(image)), rtol=1e-4, atol=1e-6)


def test_existing_file_is_kept_without_overwrite(tmp_path, capsys):
    path = tmp_path / "fcn.onnx"
    path.write_bytes(b"old")
    with pytest.raises(kfs.ModelFileError, match="overwrite"):
        kfs.export_onnx(small_flatten_cnn(), path)
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    assert cli.main(["export", model_file, str(path), "--format", "onnx"]) == 2
    assert "exists" in capsys.readouterr().err
    assert path.read_bytes() == b"old"

    assert cli.main(["export", model_file, str(path), "--format", "onnx", "--overwrite"]) == 0
    assert onnx.load(str(path)).graph.input[0].name == "images"
    assert sorted(os.listdir(tmp_path)) == ["fcn.onnx", "small.keras"]


def test_cli_refuses_savedmodel_options_with_onnx(tmp_path, capsys):
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    assert cli.main(["export", model_file, str(tmp_path / "x.onnx"), "--format", "onnx", "--version", "2"]) == 2
    assert "--format savedmodel only" in capsys.readouterr().err


def test_mismatch_with_onnxruntime_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    real_scores = export_common.keras_scores
    monkeypatch.setattr(export_common, "keras_scores", lambda fcn, images: real_scores(fcn, images) * 2.0 + 1.0)
    with pytest.raises(kfs.ExportError, match="ONNX export .* differs"):
        kfs.export_onnx(small_flatten_cnn(), tmp_path / "fcn.onnx")
    assert os.listdir(tmp_path) == []


def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    real_find_spec = onnx_export.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "tf2onnx" else real_find_spec(name, *args)

    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", find_spec)
    with pytest.raises(kfs.ExportError, match=r"tf2onnx.*pip install keras-fcn-surgery\[onnx\]"):
        kfs.export_onnx(small_flatten_cnn(), tmp_path / "fcn.onnx")
    assert os.listdir(tmp_path) == []


def test_path_must_end_in_onnx(tmp_path):
    with pytest.raises(kfs.ModelFileError, match=r"\.onnx"):
        kfs.export_onnx(keras.Sequential([keras.Input((8, 8, 3))]), tmp_path / "fcn.pb")


def test_weights_are_streamed_initializers_and_batchnorm_depthwise_models_match(tmp_path):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3)(x)
    x = keras.layers.Dropout(0.3)(x)  # its seed-generator state must not become an input
    x = keras.layers.SeparableConv2D(6, 3, activation="relu")(x)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    norm = model.layers[2]
    norm.moving_mean.assign(np.linspace(-1, 1, 8))
    norm.moving_variance.assign(np.linspace(0.5, 2, 8))
    path = tmp_path / "bn.onnx"

    result = kfs.export_onnx(model, path, options=kfs.ExportOptions(input_size=(32, 32), head="dense"))

    assert all(check.passed for check in result.checks)
    proto = onnx.load(str(path))
    assert [value.name for value in proto.graph.input] == ["images"]
    streamed = [tensor for tensor in proto.graph.initializer if tensor.name.startswith("kfs_weight_")]
    float_weights = [w for w in model.weights if "float" in str(w.dtype)]
    # Every float weight once, as raw data; the Dropout's integer seed state (unused) not at all.
    assert sorted(int(np.prod(t.dims)) for t in streamed) == sorted(int(np.prod(w.shape)) for w in float_weights)
    assert all(tensor.raw_data for tensor in streamed)
    kernel = next(t for t in proto.graph.initializer if tuple(t.dims) == (3, 3, 3, 8))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kernel), np.asarray(model.layers[1].kernel))


def test_protobuf_varints_match_the_reference_encoding():
    from google.protobuf.internal import encoder

    for value in (0, 1, 127, 128, 300, 2**31 - 1, 2**40 + 5):
        assert onnx_export._varint(value) == encoder._VarintBytes(value)


def test_keras_exporter_gives_the_same_names_and_maps_at_two_sizes(tmp_path, capsys):
    fcn = kfs.convert(small_flatten_cnn())
    path = tmp_path / "keras.onnx"
    result = kfs.export(fcn, path, format="onnx", exporter="keras", options=kfs.ExportOptions(input_size=(32, 32)))
    assert [check.input_shape for check in result.checks] == [(2, 32, 32, 3), (2, 60, 60, 3)]
    assert all(check.passed for check in (*result.checks, *result.output_checks))
    proto = onnx.load(str(path))
    assert [value.name for value in proto.graph.input] == ["images"]
    assert [value.name for value in proto.graph.output] == ["scores"]
    assert dims(proto.graph.input[0]) == ["batch", "height", "width", 3]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = random_images((1, 71, 53, 3), seed=71)
    np.testing.assert_allclose(session.run(["scores"], {"images": image})[0], np.asarray(fcn(image)), atol=1e-6)

    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    assert cli.main(["export", model_file, str(tmp_path / "cli.onnx"), "--format", "onnx", "--exporter", "keras"]) == 0
    assert "verified logits of 'fc2'" in capsys.readouterr().out
    with pytest.raises(kfs.ExportError, match=r"`exporter`.*'streamed', 'keras'.*exporter='tf2onnx'"):
        kfs.export(fcn, tmp_path / "bad.onnx", format="onnx", exporter="tf2onnx")
