"""TFLite export: free batch/height/width checked in the interpreter at two sizes; quantization measured."""

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import random_images
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli
from keras_fcn_surgery.exporting import pipeline as export_common


def interpreter(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice that tf.lite.Interpreter moves to ai-edge-litert
        return tf.lite.Interpreter(model_path=str(path))


def run_resized(path, images):
    """The flatbuffer's output after resize_tensor_input to ``images.shape``, as a client would call it."""
    runner = interpreter(path)
    (image,) = runner.get_input_details()
    runner.resize_tensor_input(image["index"], images.shape)
    runner.allocate_tensors()
    runner.set_tensor(image["index"], images)
    runner.invoke()
    return runner.get_tensor(runner.get_output_details()[0]["index"]).copy()


@pytest.fixture(scope="module")
def float_export(tmp_path_factory):
    source = small_flatten_cnn()
    path = tmp_path_factory.mktemp("tflite") / "fcn.tflite"
    return source, kfs.export_tflite(source, path)


def test_tflite_has_free_batch_height_width_and_equals_keras_at_two_sizes(float_export):
    source, result = float_export
    assert result.version is None and result.note == ""
    assert [check.input_shape for check in result.checks] == [(2, 32, 32, 3), (2, 60, 60, 3)]
    assert all(check.passed for check in result.checks)
    details = interpreter(result.path).get_input_details()[0]
    assert details["shape_signature"].tolist() == [-1, -1, -1, 3]
    assert interpreter(result.path).get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["scores"]}
    }
    fcn = kfs.convert(source)
    for shape in ((1, 32, 32, 3), (3, 71, 53, 3)):  # sizes the export check did not use
        images = random_images(shape, seed=shape[1])
        got = run_resized(result.path, images)
        want = np.asarray(fcn(images))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    small = run_resized(result.path, random_images((2, 32, 32, 3), seed=5))
    np.testing.assert_allclose(small[:, 0, 0, :], np.asarray(source(random_images((2, 32, 32, 3), seed=5))), atol=1e-5)


@pytest.mark.parametrize(
    ("quantize", "smaller"), [pytest.param("float16", 0.6, marks=pytest.mark.heavy), ("dynamic", 0.45)]
)
def test_quantized_exports_report_their_measured_difference(tmp_path, float_export, quantize, smaller):
    _, float_result = float_export
    result = kfs.export_tflite(small_flatten_cnn(), tmp_path / f"{quantize}.tflite", quantize=quantize)
    assert os.path.getsize(result.path) < smaller * os.path.getsize(float_result.path)
    # The difference is real (not hidden), reported in the result's text, and bounded.
    assert 1e-6 < result.max_rel_diff < 0.05
    assert f"quantize={quantize!r}: measured max rel diff" in str(result)
    assert "reported, not enforced" in result.note


@pytest.mark.heavy
def test_savedmodel_converts_with_tflite_converter_for_its_tensor_signatures(tmp_path):
    source = small_flatten_cnn()
    result = kfs.export_savedmodel(source, tmp_path / "m", preprocess="tf")
    with pytest.raises(Exception):  # noqa: B017  serving_bytes decodes images: TFLite has no such operation
        tf.lite.TFLiteConverter.from_saved_model(result.path).convert()
    # What the README documents: pick the tensor signatures.
    converter = tf.lite.TFLiteConverter.from_saved_model(
        result.path, signature_keys=["serving_default", "serving_pixels"]
    )
    path = tmp_path / "from_saved_model.tflite"
    path.write_bytes(converter.convert())
    fcn = kfs.convert(source)
    for shape in ((1, 32, 32, 3), (2, 64, 48, 3)):
        pixels = np.random.default_rng(shape[1]).uniform(0, 255, shape).astype(np.float32)
        want = np.asarray(fcn(pixels / 127.5 - 1.0))
        np.testing.assert_allclose(run_resized(path, pixels / 127.5 - 1.0), want, rtol=1e-4, atol=1e-5)
        by_pixels = interpreter(path).get_signature_runner("serving_pixels")(pixels=pixels)["scores"]
        np.testing.assert_allclose(by_pixels, want, rtol=1e-4, atol=1e-5)


@pytest.mark.heavy  # the library tests cover the export; this adds the CLI's flag handling
def test_cli_writes_tflite_and_refuses_options_of_other_formats(tmp_path, capsys):
    model_file = tmp_path / "small.keras"
    small_flatten_cnn().save(model_file)
    out = tmp_path / "cli.tflite"
    assert cli.main(["export", str(model_file), str(out), "--format", "tflite", "--quantize", "float16"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "measured max rel diff" in printed
    onnx_file, other = str(tmp_path / "x.onnx"), str(tmp_path / "y.tflite")
    assert cli.main(["export", str(model_file), onnx_file, "--format", "onnx", "--quantize", "dynamic"]) == 2
    assert "--quantize applies to --format tflite only" in capsys.readouterr().err
    assert cli.main(["export", str(model_file), other, "--format", "tflite", "--version", "2"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["cli.tflite", "small.keras"]


@pytest.mark.heavy  # the shared pipeline's mismatch path runs by default in test_serving and test_onnx_export
def test_mismatch_in_the_interpreter_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    real_scores = export_common.keras_scores
    monkeypatch.setattr(export_common, "keras_scores", lambda fcn, images: real_scores(fcn, images) + 0.5)
    with pytest.raises(kfs.ExportError, match="TFLite export .* differs from the Keras model"):
        kfs.export_tflite(small_flatten_cnn(), tmp_path / "bad.tflite")
    assert os.listdir(tmp_path) == []


def test_bad_arguments_are_refused_before_writing(tmp_path):
    with pytest.raises(kfs.ExportError, match="quantize"):
        kfs.export_tflite(small_flatten_cnn(), tmp_path / "a.tflite", quantize="int4")
    with pytest.raises(kfs.ModelFileError, match="must end in `.tflite`"):
        kfs.export_tflite(small_flatten_cnn(), tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == []


def test_the_converter_keeps_its_log_off_the_terminal(tmp_path):
    # Issue 28: `kfs.export_tflite` printed the converter's absl lines ("Ignored output_format", ...).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import tensorflow, keras_fcn_surgery as kfs\n"
        "from models import small_flatten_cnn\n"
        "print('START', file=sys.stderr, flush=True)\n"
        "kfs.export_tflite(small_flatten_cnn(), sys.argv[1])\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.tflite"), tests], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    after_import = done.stderr.split("START", 1)[1]
    assert "Ignored output_format" not in after_import and "W0000" not in after_import, after_import


def test_a_failing_call_shows_what_it_logged():
    from keras_fcn_surgery.native_log import native_stderr_captured

    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        with native_stderr_captured():
            os.write(2, b"quiet when all goes well\n")
        with pytest.raises(RuntimeError), native_stderr_captured():
            os.write(2, b"shown when the call fails\n")
            raise RuntimeError("boom")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
    shown = os.read(read, 4096).decode()
    os.close(read)
    assert "shown when the call fails" in shown and "quiet when all goes well" not in shown
