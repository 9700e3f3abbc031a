"""Exports at reduced precision (issue 39): written at bfloat16 or float16, checked against the float32 model at the
precision's own tolerance; formats that cannot hold a precision refuse it before anything is loaded."""

import numpy as np
import pytest
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.commands.common import EXIT_OK, EXIT_USAGE
from keras_fcn_surgery.inference.certificate import precision_tolerance


@pytest.fixture(scope="module")
def classifier():
    model = small_flatten_cnn(input_size=(32, 32), classes=3)
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_a_savedmodel_at_float16_computes_at_it_and_passes_the_check_at_its_tolerance(classifier, tmp_path):
    import tensorflow as tf

    result = kfs.export_savedmodel(
        classifier, tmp_path / "sm", options=kfs.ExportOptions(precision="float16"), bytes_signature=False
    )
    tolerance = precision_tolerance("float16")
    assert result.checks and all(c.tolerance == tolerance and c.passed for c in result.checks)
    assert "float16" in result.note and f"{tolerance:g}" in result.note
    # the file computes at float16: not the float32 model's bytes, within float16's tolerance of them
    loaded = tf.saved_model.load(result.path)
    images = np.random.default_rng(0).uniform(0, 1, (1, 40, 40, 3)).astype(np.float32)
    got = loaded.signatures["serving_default"](tf.constant(images))["scores"].numpy()
    want = np.asarray(kfs.convert(classifier)(images))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert 0 < np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_an_onnx_file_at_float16_passes_the_check_at_its_tolerance(classifier, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    result = kfs.export_onnx(classifier, tmp_path / "fcn.onnx", options=kfs.ExportOptions(precision="float16"))
    assert all(c.tolerance == precision_tolerance("float16") and c.passed for c in result.checks)
    assert 0 < result.max_rel_diff <= precision_tolerance("float16")


def test_formats_that_cannot_hold_a_precision_refuse_it_before_loading(tmp_path):
    missing = tmp_path / "missing.keras"  # never loaded: the refusal comes first
    with pytest.raises(kfs.ExportError, match="TFLite has no bfloat16"):
        kfs.export_tflite(missing, tmp_path / "fcn.tflite", options=kfs.ExportOptions(precision="bfloat16"))
    with pytest.raises(kfs.ExportError, match="precision='bfloat16'.*OpenVINO"):
        kfs.export(missing, tmp_path / "ov", format="openvino", options=kfs.ExportOptions(precision="bfloat16"))
    with pytest.raises(kfs.InputError, match="precision"):
        kfs.export(missing, tmp_path / "sm", options=kfs.ExportOptions(precision="half"))
    with pytest.raises(kfs.ExportError, match="not both"):
        kfs.export_tflite(
            missing, tmp_path / "fcn.tflite", quantize="dynamic", options=kfs.ExportOptions(precision="float16")
        )


def test_the_cli_exports_at_a_precision(classifier, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    classifier.save(tmp_path / "model.keras")
    code = main(["export", str(tmp_path / "model.keras"), str(tmp_path / "fcn.onnx"), "--format", "onnx",
                 "--precision", "bfloat16"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == EXIT_OK and "written at bfloat16" in out and f"{precision_tolerance('bfloat16'):g}" in out
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path / "model.keras"), str(tmp_path / "sm"), "--precision", "double"])
    assert exited.value.code == EXIT_USAGE
