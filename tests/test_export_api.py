"""`kfs.export(model, path, format=...)`: the one export entry point, its formats and its refusals."""

import dataclasses
import os
import subprocess
import sys
import types
import warnings

import keras
import numpy as np
import pytest
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.options import EXPORT_FORMATS


def test_kfs_export_is_the_function_even_after_the_export_modules_are_imported():
    code = (
        "import importlib, pkgutil, types\n"
        "import keras_fcn_surgery.exporting.api, keras_fcn_surgery.exporting.onnx\n"
        "import keras_fcn_surgery as kfs\n"
        "for module in pkgutil.walk_packages(kfs.exporting.__path__, 'keras_fcn_surgery.exporting.'):\n"
        "    importlib.import_module(module.name)\n"
        "assert isinstance(kfs.export, types.FunctionType), kfs.export\n"
        "assert kfs.export is keras_fcn_surgery.exporting.api.export\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    assert isinstance(kfs.export, types.FunctionType) and "export" in kfs.__all__


def test_every_format_the_cli_offers_is_a_format_of_export():
    from keras_fcn_surgery.exporting.api import FORMATS

    assert tuple(FORMATS) == EXPORT_FORMATS


def test_savedmodel_by_format(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.UninformativeVerificationWarning)  # a model whose scores vary: no warning
        result = kfs.export(small_flatten_cnn(), tmp_path / "models", format="savedmodel", bytes_signature=False)
    assert result.path == str(tmp_path / "models" / "1") and result.version == 1
    assert len(result.checks) == 2 and all(check.passed for check in result.checks)
    assert os.path.isfile(os.path.join(result.path, "saved_model.pb"))


def test_onnx_by_format(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    path = tmp_path / "fcn.onnx"
    result = kfs.export(small_flatten_cnn(), path, format="onnx")
    assert result.path == str(path) and result.version is None and path.is_file()
    assert [check.input_shape[1:3] for check in result.checks] == [(32, 32), (60, 60)]
    assert all(check.passed for check in result.checks)


def test_tflite_by_format_passes_its_own_option(tmp_path):
    path = tmp_path / "fcn.tflite"
    result = kfs.export(small_flatten_cnn(), path, format="tflite", quantize="float16")
    assert result.path == str(path) and path.is_file()
    assert "quantize='float16'" in result.note and len(result.checks) == 2


def test_unknown_format_is_an_input_error_naming_the_formats(tmp_path):
    with pytest.raises(kfs.InputError, match=r"`format`.*'savedmodel', 'onnx', 'tflite'.*format='pdf'"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn.pdf", format="pdf")
    assert os.listdir(tmp_path) == []


def test_an_option_of_another_format_is_an_input_error_naming_the_formats_options(tmp_path):
    with pytest.raises(kfs.InputError, match="format='onnx' does not take quantize: its options are opset"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn.onnx", format="onnx", quantize="float16")
    with pytest.raises(kfs.InputError, match="does not take opset, preprocess"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn.tflite", format="tflite", preprocess="caffe", opset=13)
    assert os.listdir(tmp_path) == []


def test_a_bad_option_value_and_a_model_of_two_inputs_are_export_errors(tmp_path):
    with pytest.raises(kfs.ExportError, match="quantize"):
        kfs.export(small_flatten_cnn(), tmp_path / "fcn.tflite", format="tflite", quantize="int4")
    images = [keras.Input((16, 16, 3)), keras.Input((16, 16, 3))]
    features = keras.layers.Conv2D(4, 3)(keras.layers.Add()(images))
    two_inputs = keras.Model(images, features, name="two_inputs")
    with pytest.raises(kfs.ExportError, match="'two_inputs' has 2 inputs and 1 outputs; a serving export"):
        kfs.export(two_inputs, tmp_path / "models")
    assert os.listdir(tmp_path) == []


def test_cli_export_goes_through_export_with_the_formats_options(tmp_path, monkeypatch):
    model_file = tmp_path / "small.keras"
    small_flatten_cnn().save(model_file)
    calls = []
    monkeypatch.setattr(kfs, "export", lambda model, path, **options: calls.append((path, options)) or "done")
    out = str(tmp_path / "fcn.tflite")
    assert cli.main(["export", str(model_file), out, "--format", "tflite", "--quantize", "dynamic"]) == 0
    assert cli.main(["export", str(model_file), str(tmp_path / "m"), "--version", "3"]) == 0
    (path, options), (folder, saved) = calls
    assert path == out and options["format"] == "tflite" and options["quantize"] == "dynamic"
    assert saved["format"] == "savedmodel" and saved["version"] == 3 and saved["preprocess"] == "none"


def test_an_export_whose_check_cannot_tell_right_from_wrong_warns(tmp_path, capsys):
    # Issue 28: a softmax over collapsed features is a constant; the export check called it "equal".
    collapsed = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(2, 3, kernel_initializer="zeros", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax", name="fc"),
        ],
        name="collapsed",
    )
    with pytest.warns(kfs.UninformativeVerificationWarning, match="export of 'collapsed_fcn' proves little"):
        result = kfs.export(collapsed, tmp_path / "models", format="savedmodel")
    assert not all(check.informative for check in result.checks)
    assert "uninformative" in str(result.checks[0])
    model_file = str(tmp_path / "collapsed.keras")
    collapsed.save(model_file)
    assert cli.main(["export", model_file, str(tmp_path / "cli")]) == 0
    assert "warning: The check of the savedmodel export of 'collapsed_fcn' proves little" in capsys.readouterr().err


def _tiny_logits_classifier():
    """A classifier whose logits vary but are ~1e-9: its float32 softmax is exactly 1/5 everywhere."""
    model = small_flatten_cnn(classes=5)
    last = model.get_layer("fc2")
    last.kernel.assign(last.kernel * 1e-9)
    last.bias.assign(last.bias + 1e-9)
    return model


def test_an_export_checks_the_logits_where_its_probabilities_are_constant(tmp_path):
    # Issue 28: exports compared softmax outputs, a constant 1/K here, and reported "equal".
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    model = _tiny_logits_classifier()
    probabilities = kfs.convert(model)(np.random.default_rng(0).standard_normal((2, 40, 40, 3)))
    assert np.ptp(np.asarray(probabilities)) == 0  # the file's outputs cannot tell a right file from a wrong one
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.UninformativeVerificationWarning)  # its logits vary: no warning
        result = kfs.export(model, tmp_path / "fcn.onnx", format="onnx")
    assert [check.compared for check in result.checks] == ["logits of 'fc2'"] * 2
    assert all(check.passed and check.informative for check in result.checks)
    assert all(check.output_scale < 1e-7 for check in result.checks)  # relative to the logits' own scale
    assert len(result.output_checks) == 2 and all(check.passed for check in result.output_checks)
    assert "verified logits of 'fc2'" in str(result) and "file outputs: verified" in str(result)


def test_an_export_whose_writer_breaks_the_logits_is_refused_even_when_its_probabilities_agree(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    from keras_fcn_surgery.exporting.onnx import OnnxFormat

    real_write = OnnxFormat.write

    def write_with_a_wrong_kernel(self, fcn, path):  # a writer bug: the last kernel 1% off in the file
        kernel = fcn.get_layer("fc2").kernel
        saved = keras.ops.convert_to_numpy(kernel)
        kernel.assign(saved * 1.01)
        try:
            real_write(self, fcn, path)
        finally:
            kernel.assign(saved)

    monkeypatch.setattr(OnnxFormat, "write", write_with_a_wrong_kernel)
    with pytest.raises(kfs.ExportError, match=r"differs from the Keras model: verified logits of 'fc2'.*DIFFERENT"):
        kfs.export(_tiny_logits_classifier(), tmp_path / "fcn.onnx", format="onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.heavy  # the shared check runs by default above; this is the issue's own command
def test_a_quantized_tflite_export_reports_its_difference_on_the_logits(tmp_path):
    result = kfs.export(_tiny_logits_classifier(), tmp_path / "fcn.tflite", format="tflite", quantize="dynamic")
    assert 1e-4 < result.max_rel_diff < 0.1  # int8 weights change the logits: not "max rel diff 0 ... equal"
    assert "logits of 'fc2'" in result.note


def test_what_every_format_shares_is_one_options_object_given_one_way(tmp_path):
    # Issue 35: no public entry point past about 8 parameters; `ExportOptions` is the only way to pass them.
    model = small_flatten_cnn()
    with pytest.raises(kfs.InputError, match=r"export\(\.\.\., options=ExportOptions\(precision='float16'\)\)"):
        kfs.export(model, tmp_path / "fcn.onnx", format="onnx", precision="float16")
    for shortcut in (kfs.export_savedmodel, kfs.export_onnx, kfs.export_tflite):
        with pytest.raises(TypeError, match="precision"):
            shortcut(model, tmp_path / "fcn", precision="float16")
    with pytest.raises(kfs.InputError, match="Expected `options` to be an ExportOptions"):
        kfs.export(model, tmp_path / "models", options={"precision": "float16"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        kfs.ExportOptions().precision = "float16"
    assert os.listdir(tmp_path) == []
