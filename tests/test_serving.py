"""SavedModel export for TF Serving: signatures, a fresh-process reload, bytes input, versions, atomicity."""

import hashlib
import io
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_images, run_tool
from models import small_flatten_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery import cli, preprocessing
from keras_fcn_surgery.exporting import pipeline as export_common
from keras_fcn_surgery.exporting import savedmodel as serving
from keras_fcn_surgery.saving import atomic
from keras_fcn_surgery.zoo import caffenet

# Loads a SavedModel with TensorFlow alone: importing keras_fcn_surgery is made to fail.
FRESH_PROCESS_SCRIPT = """
import sys

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_fcn_surgery":
            raise ImportError("keras_fcn_surgery is not importable in this process")
        return None

sys.meta_path.insert(0, _Refuse())
import numpy as np
import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
inputs = np.load(sys.argv[2])
outputs = {key: serve(images=tf.constant(inputs[key]))["scores"].numpy() for key in inputs.files}
assert not any(name.split(".")[0] == "keras_fcn_surgery" for name in sys.modules)
np.savez(sys.argv[3], **outputs)
"""


def run_in_fresh_process(saved_model, inputs: dict, scratch) -> dict:
    """serving_default of ``saved_model`` on each input, computed by a Python that cannot import this package."""
    scratch = str(scratch)
    np.savez(os.path.join(scratch, "in.npz"), **inputs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    process = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS_SCRIPT, saved_model, "in.npz", "out.npz"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with np.load(os.path.join(scratch, "out.npz")) as loaded:
        return {key: loaded[key] for key in loaded.files}


def tree_hashes(folder) -> dict:
    """SHA-256 of every file under ``folder``, keyed by relative path."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return hashes


def hidden_entries(folder) -> list:
    return [name for name in os.listdir(folder) if name.startswith(".")]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- CaffeNet: the example ---------------------------------------------------------------


@pytest.fixture(scope="module")
def caffenet_export(tmp_path_factory):
    source = caffenet()
    fcn = kfs.convert(source)
    export_dir = tmp_path_factory.mktemp("caffenet_serving")
    result = kfs.export_savedmodel(fcn, export_dir, options=kfs.ExportOptions(input_size=(227, 227)))
    return source, fcn, result


def test_caffenet_savedmodel_reloads_without_this_package(caffenet_export, tmp_path):
    source, fcn, result = caffenet_export
    assert result.path.endswith(os.sep + "1") and result.version == 1
    assert os.path.isfile(os.path.join(result.path, "saved_model.pb"))
    assert os.path.isdir(os.path.join(result.path, "variables"))
    assert [check.input_shape[1:3] for check in result.checks] == [(227, 227), (451, 451)]

    inputs = {"small": random_images((2, 227, 227, 3), seed=1), "large": random_images((1, 451, 451, 3), seed=2)}
    outputs = run_in_fresh_process(result.path, inputs, tmp_path)

    assert outputs["small"].shape == (2, 1, 1, 1000)
    assert outputs["large"].shape == (1, 8, 8, 1000)
    classifier = np.asarray(source(inputs["small"], training=False))
    np.testing.assert_allclose(outputs["small"][:, 0, 0, :], classifier, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(outputs["large"], np.asarray(fcn(inputs["large"])), rtol=1e-4, atol=1e-7)


def test_saved_model_cli_lists_free_height_and_width(caffenet_export):
    _, _, result = caffenet_export
    command = shutil.which("saved_model_cli")
    command = [command] if command else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    process = subprocess.run(
        [*command, "show", "--all", "--dir", result.path],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    default = process.stdout.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    images = default.split("inputs['images']")[1].split("outputs[")[0]
    assert "dtype: DT_FLOAT" in images and "shape: (-1, -1, -1, 3)" in images
    scores = default.split("outputs['scores']")[1]
    assert "shape: (-1, -1, -1, 1000)" in scores
    byte_signature = process.stdout.split("signature_def['serving_bytes']")[1]
    assert "inputs['image_bytes']" in byte_signature and "DT_STRING" in byte_signature


# --- serving_bytes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A small classifier exported with Caffe preprocessing into a folder that already holds version 3."""
    keras.utils.set_random_seed(7)
    source = small_flatten_cnn()
    export_dir = tmp_path_factory.mktemp("small_serving")
    os.makedirs(export_dir / "3")
    (export_dir / "notes").mkdir()
    (export_dir / "12.txt").write_text("not a version")
    result = kfs.export_savedmodel(source, export_dir, preprocess="caffe")
    return source, export_dir, result


def test_version_auto_increments_past_highest_numeric_folder(small_export):
    _, export_dir, result = small_export
    assert result.version == 4
    assert result.path == os.path.join(str(export_dir), "4")
    assert sorted(os.listdir(export_dir)) == ["12.txt", "3", "4", "notes"]
    assert serving.next_version(export_dir) == 5


def test_next_version_of_missing_or_empty_folder_is_one(tmp_path):
    assert serving.next_version(tmp_path / "missing") == 1
    assert serving.next_version(tmp_path) == 1


def test_serving_bytes_on_png_equals_serving_default_on_preprocessed_pixels(small_export):
    _, _, result = small_export
    loaded = tf.saved_model.load(result.path)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 40, 44, 3), dtype=np.uint8)
    encoded = tf.constant([png_bytes(image) for image in pixels])

    from_bytes = loaded.signatures["serving_bytes"](image_bytes=encoded)["scores"].numpy()

    decoded = np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in encoded.numpy()])
    np.testing.assert_array_equal(decoded, pixels)
    preprocessed = keras.applications.imagenet_utils.preprocess_input(decoded.astype("float32"), mode="caffe")
    from_pixels = loaded.signatures["serving_default"](images=tf.constant(preprocessed))["scores"].numpy()
    assert from_bytes.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(from_bytes, from_pixels, rtol=1e-5, atol=1e-7)


def test_serving_bytes_refuses_mixed_sizes_and_empty_batches(small_export):
    _, _, result = small_export
    loaded = tf.saved_model.load(result.path)
    rng = np.random.default_rng(4)
    encoded = [png_bytes(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((40, 40, 3), (48, 40, 3))]
    with pytest.raises(tf.errors.InvalidArgumentError, match="same height and width"):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant(encoded))
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one image"):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([], tf.string))


def test_serving_bytes_accepts_a_single_jpeg(small_export):
    _, _, result = small_export
    loaded = tf.saved_model.load(result.path)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(buffer, "JPEG")
    scores = loaded.signatures["serving_bytes"](image_bytes=tf.constant([buffer.getvalue()]))["scores"]
    assert tuple(scores.shape) == (1, 2, 2, 5)


@pytest.mark.parametrize("mode", preprocessing.PREPROCESS_MODES)
def test_preprocessing_follows_keras_applications(mode):
    pixels = np.random.default_rng(6).integers(0, 256, (2, 5, 7, 3)).astype("float32")
    got = preprocessing.preprocess_images(tf.constant(pixels), mode).numpy()
    if mode in ("none", "unit"):  # not keras.applications modes: the pixels as they are, and pixels / 255
        want = pixels if mode == "none" else pixels / 255
    else:
        want = keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


# --- overwrite, atomicity, checks --------------------------------------------------------------------


def test_cli_refuses_to_overwrite_a_version_and_leaves_it_unchanged(tmp_path, capsys):
    keras.utils.set_random_seed(8)
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    export_dir = tmp_path / "models"
    assert cli.main(["export", model_file, str(export_dir), "--version", "1", "--preprocess", "tf"]) == 0
    assert "wrote" in capsys.readouterr().out
    before = tree_hashes(export_dir / "1")

    code = cli.main(["export", model_file, str(export_dir), "--version", "1"])

    assert code != 0
    message = capsys.readouterr().err
    assert "already exists" in message and "--overwrite" in message and str(export_dir / "1") in message
    assert tree_hashes(export_dir / "1") == before
    assert sorted(os.listdir(export_dir)) == ["1"]


def test_overwrite_replaces_a_version_of_an_already_converted_fcn(small_export, tmp_path):
    source, _, result = small_export
    export_dir = tmp_path / "models"
    shutil.copytree(result.path, export_dir / "1")
    before = tree_hashes(export_dir / "1")
    keras.utils.set_random_seed(9)
    other = kfs.convert(small_flatten_cnn())

    replaced = kfs.export_savedmodel(
        other,
        export_dir,
        version=1,
        overwrite=True,
        options=kfs.ExportOptions(convert=False, input_size=(32, 32)),
        bytes_signature=False,
    )

    assert replaced.path == str(export_dir / "1")
    assert tree_hashes(export_dir / "1") != before
    assert sorted(os.listdir(export_dir)) == ["1"]
    loaded = tf.saved_model.load(replaced.path)
    assert sorted(loaded.signatures.keys()) == ["serving_default"]
    image = random_images((1, 32, 32, 3))
    np.testing.assert_allclose(
        loaded.signatures["serving_default"](images=image)["scores"].numpy(), np.asarray(other(image)), rtol=1e-5
    )


def test_failure_while_writing_leaves_no_partial_version(tmp_path, monkeypatch):
    export_dir = tmp_path / "models"
    export_dir.mkdir()

    def write_half_then_fail(self, filepath, options=None, verbose=True):
        os.makedirs(os.path.join(filepath, "variables"))
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    archive_class = type(keras.export.ExportArchive())
    monkeypatch.setattr(archive_class, "write_out", write_half_then_fail)
    with pytest.raises(kfs.ModelFileError, match="No space left on device"):
        kfs.export_savedmodel(small_flatten_cnn(), export_dir)
    assert os.listdir(export_dir) == []


def test_unwritable_export_folder_is_a_clear_error_and_creates_nothing(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(kfs.ModelFileError, match="Cannot create export folder"):
        kfs.export_savedmodel(small_flatten_cnn(), blocker / "models")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_read_only_export_folder_leaves_no_partial_version(tmp_path, monkeypatch):
    # Tests run as root, which chmod cannot stop: simulate the refusal a read-only folder gives.
    export_dir = tmp_path / "models"
    export_dir.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    with pytest.raises(kfs.ModelFileError, match="Cannot write in export folder .*Permission denied"):
        kfs.export_savedmodel(small_flatten_cnn(), export_dir)
    assert os.listdir(export_dir) == []


def test_mismatch_in_the_fresh_process_is_an_error_and_keeps_nothing(tmp_path, monkeypatch):
    export_dir = tmp_path / "models"
    real_scores = export_common.keras_scores
    monkeypatch.setattr(export_common, "keras_scores", lambda fcn, images: real_scores(fcn, images) + 0.5)
    with pytest.raises(kfs.ExportError, match="differs from the Keras model"):
        kfs.export_savedmodel(small_flatten_cnn(), export_dir)
    assert not export_dir.exists()  # the folder this export created is removed with the partial version


def test_channels_first_model_serves_channels_last_images(tmp_path):
    source = small_flatten_cnn(data_format="channels_first")
    result = kfs.export_savedmodel(source, tmp_path / "models", bytes_signature=False)
    loaded = tf.saved_model.load(result.path)
    signature = loaded.signatures["serving_default"]
    assert signature.structured_input_signature[1]["images"].shape.as_list() == [None, None, None, 3]
    image = random_images((1, 3, 32, 32))
    scores = signature(images=tf.constant(np.transpose(image, (0, 2, 3, 1))))["scores"].numpy()
    np.testing.assert_allclose(scores[:, 0, 0, :], np.asarray(source(image)), rtol=1e-4, atol=1e-7)


def test_classifier_with_no_convert_is_refused(tmp_path):
    with pytest.raises(kfs.ExportError, match="not fully convolutional"):
        kfs.export_savedmodel(small_flatten_cnn(), tmp_path / "models", options=kfs.ExportOptions(convert=False))
    assert not os.path.exists(tmp_path / "models")


def test_bad_arguments_are_refused_before_writing(tmp_path):
    with pytest.raises(kfs.ExportError, match="preprocess"):
        kfs.export_savedmodel(small_flatten_cnn(), tmp_path / "a", preprocess="imagenet")
    with pytest.raises(kfs.ExportError, match="version"):
        kfs.export_savedmodel(small_flatten_cnn(), tmp_path / "b", version=-1)
    two_channels = small_flatten_cnn(channels=2)
    with pytest.raises(kfs.ExportError, match="bytes_signature=False"):
        kfs.export_savedmodel(two_channels, tmp_path / "c")
    assert os.listdir(tmp_path) == []


def test_export_tool_exit_codes(tmp_path):
    keras.utils.set_random_seed(10)
    model_file = str(tmp_path / "small.keras")
    small_flatten_cnn().save(model_file)
    export_dir = str(tmp_path / "m")

    usage = run_tool("export_savedmodel.py", "--model", model_file, "--export_dir", export_dir, "--preprocess", "bgr")
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines()[-1].startswith("error: flag --preprocess=bgr")

    refused = run_tool("export_savedmodel.py", "--model", model_file, "--export_dir", export_dir, "--noconvert")
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not fully convolutional" in last
    assert not os.path.exists(tmp_path / "m")
