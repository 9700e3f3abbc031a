"""OpenVINO export: Keras's exporter, a folder with model.xml and model.bin, checked in the OpenVINO runtime."""

import os

import numpy as np
import pytest
from conftest import random_images
from models import small_flatten_cnn, valid_gap_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.exporting import openvino as openvino_export
from keras_fcn_surgery.exporting import pipeline as export_common

openvino = pytest.importorskip("openvino")  # the `openvino` extra (in the test extra: CI has it)

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def compiled(folder):
    core = openvino.Core()
    model = core.read_model(os.path.join(folder, "model.xml"))
    return model, core.compile_model(model, "CPU", F32)


def test_openvino_equals_keras_at_two_sizes_with_free_height_and_width(tmp_path):
    source = small_flatten_cnn()
    fcn = kfs.convert(source)
    folder = tmp_path / "fcn_ov"

    result = kfs.export(fcn, folder, format="openvino", options=kfs.ExportOptions(input_size=(32, 32)))

    assert result.path == str(folder) and result.version is None
    assert sorted(os.listdir(folder)) == ["model.bin", "model.xml"] and sorted(os.listdir(tmp_path)) == ["fcn_ov"]
    assert [check.input_shape for check in result.checks] == [(2, 32, 32, 3), (2, 60, 60, 3)]
    assert all(check.passed for check in result.checks) and "INFERENCE_PRECISION_HINT" in result.note
    assert result.checks[0].compared == "logits of 'fc2'" and len(result.output_checks) == 2
    model, runner = compiled(folder)
    assert model.inputs[0].get_any_name() == "images" and model.outputs[0].get_any_name() == "scores"
    assert [dim.is_dynamic for dim in model.inputs[0].get_partial_shape()] == [True, True, True, False]
    assert model.get_parameters()[0].get_element_type() == openvino.Type.f32
    for shape in ((1, 71, 53, 3), (2, 32, 32, 3)):
        image = random_images(shape, seed=shape[1])
        scores = runner({"images": image})["scores"]
        expected = np.asarray(fcn(image))
        assert scores.shape == expected.shape
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6 * abs(expected).max())
    weights = [op for op in model.get_ops() if op.get_type_name() == "Constant" and op.get_output_size() == 1]
    assert all(op.get_output_element_type(0) != openvino.Type.f16 for op in weights)  # float32, not compressed


def test_global_pooling_head_and_channels_first_layout(tmp_path):
    result = kfs.export(
        valid_gap_cnn(), tmp_path / "gap", format="openvino", options=kfs.ExportOptions(head="dense")
    )
    assert result.checks[0].input_shape == (2, 24, 24, 3) and all(check.passed for check in result.checks)

    channels_first = small_flatten_cnn(data_format="channels_first")
    kfs.export(channels_first, tmp_path / "cf", format="openvino")
    model, runner = compiled(tmp_path / "cf")
    assert [dim.is_dynamic for dim in model.inputs[0].get_partial_shape()] == [True, False, True, True]
    image = random_images((1, 3, 32, 32))
    scores = runner({"images": image})["scores"]
    np.testing.assert_allclose(scores[:, :, 0, 0], np.asarray(channels_first(image)), rtol=1e-4, atol=1e-6)


def test_the_output_is_a_folder_kept_without_overwrite(tmp_path, capsys):
    with pytest.raises(kfs.ModelFileError, match=r"names a file; an OpenVINO export is a folder .*'.*fcn'"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn.xml", format="openvino")
    with pytest.raises(kfs.ModelFileError, match="does not exist"):
        kfs.export(small_flatten_cnn(), tmp_path / "missing" / "fcn", format="openvino")
    folder = tmp_path / "fcn"
    folder.mkdir()
    (folder / "model.xml").write_text("old")
    with pytest.raises(kfs.ModelFileError, match="overwrite"):
        kfs.export(small_flatten_cnn(), folder, format="openvino")
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    assert cli.main(["export", model_file, str(folder), "--format", "openvino"]) == 2
    assert "exists" in capsys.readouterr().err
    assert os.listdir(folder) == ["model.xml"] and (folder / "model.xml").read_text() == "old"

    assert cli.main(["export", model_file, str(folder), "--format", "openvino", "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["model.bin", "model.xml"]
    assert sorted(os.listdir(tmp_path)) == ["fcn", "small.keras"]
    assert cli.main(["export", model_file, str(tmp_path / "x"), "--format", "openvino", "--exporter", "keras"]) == 2
    assert "--exporter applies to --format onnx only" in capsys.readouterr().err


def test_mismatch_with_the_runtime_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    real_scores = export_common.keras_scores
    monkeypatch.setattr(export_common, "keras_scores", lambda fcn, images: real_scores(fcn, images) * 2.0 + 1.0)
    with pytest.raises(kfs.ExportError, match="OpenVINO export .* differs"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn", format="openvino")
    assert os.listdir(tmp_path) == []


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    real_find_spec = openvino_export.importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "openvino" else real_find_spec(name, *args)

    monkeypatch.setattr(openvino_export.importlib.util, "find_spec", find_spec)
    with pytest.raises(kfs.ExportError, match=r"pip install keras-fcn-surgery\[openvino\]"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn", format="openvino")
    assert os.listdir(tmp_path) == []
