"""Checks that prove something (issue 9): informative batches, logits, user images, honest input sizes."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers
from models import small_flatten_cnn, valid_gap_cnn
from PIL import Image

import keras_fcn_surgery as kfs
from keras_fcn_surgery.cli import main
from keras_fcn_surgery.commands.common import EXIT_CONVERSION, EXIT_OK, EXIT_USAGE


def _collapsed_classifier():
    """A classifier whose ReLU features are 0 for every input: its scores never depend on the image."""
    model = valid_gap_cnn(softmax=False)
    conv = model.get_layer("conv1")
    conv.bias.assign(np.full(conv.bias.shape, -1e3, "float32"))
    return model


# Uninformative checks ---------------------------------------------------------------


def test_collapsed_features_make_the_check_uninformative():
    source = _collapsed_classifier()
    with pytest.warns(kfs.UninformativeVerificationWarning, match="'valid_gap_cnn'.*verify_inputs"):
        kfs.convert(source)
    with pytest.warns(kfs.UninformativeVerificationWarning):
        result = kfs.verify(source, kfs.convert(source, verify=False))
    assert result.passed and not result.informative
    assert "uninformative" in str(result)


def test_a_trained_looking_classifier_gives_no_warning():
    source = small_flatten_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.UninformativeVerificationWarning)
        fcn = kfs.convert(source)
    result = kfs.verify(source, fcn)
    assert result.informative and result.input_spread > 10 * result.tolerance


def test_uninformative_warning_is_exported():
    assert issubclass(kfs.UninformativeVerificationWarning, UserWarning)
    assert "UninformativeVerificationWarning" in kfs.__all__


# Logits -----------------------------------------------------------------------------


def test_logits_before_a_softmax_dense_are_compared():
    source = small_flatten_cnn()
    fcn = kfs.convert(source)
    result = kfs.verify(source, fcn)
    assert result.compared == "logits of 'fc2'" and "logits of 'fc2'" in str(result)
    # Adding the same constant to every logit leaves the softmax unchanged: only the logits show it.
    fc2 = fcn.get_layer("fc2")
    fc2.bias.assign(np.asarray(fc2.bias) + 5.0)
    probabilities = np.asarray(source(random_images((2, 32, 32, 3))))
    np.testing.assert_allclose(np.asarray(fcn(random_images((2, 32, 32, 3))))[:, 0, 0], probabilities, atol=1e-5)
    assert not kfs.verify(source, fcn).passed


def test_logits_before_a_softmax_layer_and_in_channels_first():
    inputs = keras.Input((3, 16, 16))
    x = layers.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    x = layers.Flatten(data_format="channels_first")(x)
    x = layers.Dense(3, name="scores")(x)
    source = keras.Model(inputs, layers.Activation("softmax", name="probs")(x))
    result = kfs.verify(source, kfs.convert(source))
    assert result.passed and result.compared == "logits of 'probs'"
    sigmoid = small_flatten_cnn(data_format="channels_first")
    sigmoid.get_layer("fc2").activation = keras.activations.sigmoid
    assert kfs.verify(sigmoid, kfs.convert(sigmoid)).compared == "logits of 'fc2'"


def test_a_linear_head_compares_its_outputs():
    source = small_flatten_cnn(softmax=False)
    assert kfs.verify(source, kfs.convert(source)).compared == "outputs"


# The check batch --------------------------------------------------------------------


def test_verify_inputs_are_the_check_batch():
    source = small_flatten_cnn()
    images = random_images((5, 32, 32, 3), seed=3)
    fcn = kfs.convert(source, verify_inputs=images)
    result = kfs.verify(source, fcn, inputs=images)
    assert result.passed and result.input_shape == (5, 32, 32, 3)


def test_verify_inputs_of_the_wrong_shape():
    with pytest.raises(kfs.ConversionError, match=r"verify_inputs.*\(5, 30, 30, 3\).*\(N, 32, 32, 3\)"):
        kfs.convert(small_flatten_cnn(), verify_inputs=random_images((5, 30, 30, 3)))
    with pytest.raises(kfs.ConversionError, match="verify=False"):
        kfs.convert(small_flatten_cnn(), verify=False, verify_inputs=random_images((5, 32, 32, 3)))


def test_dense_head_verification_through_the_public_check():
    source = valid_gap_cnn()
    dense = kfs.convert(source, head="dense")
    assert kfs.verify(source, dense, head="dense").passed
    with pytest.raises(kfs.ConversionError, match="head='dense'"):
        kfs.verify(source, dense)


def _write_images(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{index}.png")
    return folder


def test_cli_verify_images(tmp_path, capsys):
    source = tmp_path / "classifier.keras"
    small_flatten_cnn().save(source)
    images = _write_images(tmp_path / "images", [(40, 50), (32, 32), (64, 20)])
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(source), str(output), "--verify-images", str(images)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "(3, 32, 32, 3)" in out and "equal" in out


def test_cli_verify_images_from_an_empty_folder(tmp_path, capsys):
    source = tmp_path / "classifier.keras"
    small_flatten_cnn().save(source)
    (tmp_path / "empty").mkdir()
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(source), str(output), "--verify-images", str(tmp_path / "empty")]) == EXIT_USAGE
    assert "no images" in capsys.readouterr().err
    assert not output.exists()


def test_cli_prints_the_uninformative_warning(tmp_path, capsys):
    source = tmp_path / "collapsed.keras"
    _collapsed_classifier().save(source)
    assert main(["convert", str(source), str(tmp_path / "fcn.keras")]) == EXIT_OK
    assert "--verify-images" in capsys.readouterr().err


# input_size -------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_input_size_that_contradicts_a_fixed_input(verify):
    with pytest.raises(kfs.ConversionError, match=r"24x24.*input_size=\(32, 32\)") as info:
        kfs.convert(valid_gap_cnn(), input_size=(32, 32), verify=verify)
    assert "Traceback" not in str(info.value)
    with pytest.raises(kfs.ConversionError, match="24x24"):
        kfs.plan(valid_gap_cnn(), input_size=(32, 32))


def test_input_size_equal_to_the_fixed_input_is_fine():
    assert kfs.plan(valid_gap_cnn(), input_size=(24, 24)).input_size == (24, 24)


def test_cli_input_size_that_contradicts_a_fixed_input(tmp_path, capsys):
    source = tmp_path / "gap.keras"
    valid_gap_cnn().save(source)
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(source), str(output), "--input-size", "32x32"]) == EXIT_CONVERSION
    assert "24x24" in capsys.readouterr().err
    assert not output.exists()


# head="dense" without a global pooling ------------------------------------------------


def test_dense_head_on_a_flatten_dense_model_warns():
    with pytest.warns(kfs.IgnoredHeadWarning, match="'small_flatten_cnn'.*no global-pooling head"):
        kfs.convert(small_flatten_cnn(), head="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error", kfs.IgnoredHeadWarning)
        kfs.convert(valid_gap_cnn(), head="dense")


# Flatten of a vector ------------------------------------------------------------------


@pytest.mark.parametrize("head", ["window", "dense"])
def test_flatten_of_a_pooled_vector_is_removed(head):
    """keras-hub HGNetV2's head: GlobalAveragePooling2D -> Flatten -> Dropout -> Dense."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dropout(0.2, name="drop")(x)
    source = keras.Model(inputs, layers.Dense(4, name="logits")(x), name="hgnet_like")
    plan = {rewrite.layer_name: rewrite for rewrite in kfs.plan(source, head=head).rewrites}
    assert plan["flat"].new_class == "(removed)" and plan["flat"].kind is kfs.RewriteKind.REMOVED
    fcn = kfs.convert(source, head=head)
    assert kfs.verify(source, fcn, head=head).passed
    image = random_images((1, 30, 30, 3))
    cells = 15 if head == "window" else 28
    assert tuple(fcn(image).shape) == (1, cells, cells, 4)


# Keras 2 ------------------------------------------------------------------------------

_WRITE_KERAS2_FILES = textwrap.dedent(
    """
    import sys
    import tf_keras
    model = tf_keras.Sequential([
        tf_keras.Input((20, 20, 3)),
        tf_keras.layers.Conv2D(6, 3, activation="relu"),
        tf_keras.layers.MaxPooling2D(2),
        tf_keras.layers.Flatten(),
        tf_keras.layers.Dense(8, activation="relu"),
        tf_keras.layers.Dense(3, activation="softmax"),
    ], name="keras2_classifier")
    model.save(sys.argv[1] + "/legacy.h5")
    model.save(sys.argv[1] + "/saved_model")
    """
)


# Written by _WRITE_KERAS2_FILES with tf-keras 2.21; the heavy run writes them again with the installed tf-keras.
SHIPPED_KERAS2_FILES = Path(__file__).parent / "data" / "keras2"


@pytest.fixture(scope="module", params=["shipped", pytest.param("fresh", marks=pytest.mark.heavy)])
def keras2_files(request, tmp_path_factory):
    if request.param == "shipped":
        return SHIPPED_KERAS2_FILES
    pytest.importorskip("tf_keras", reason="tf-keras is in the `test` extra")
    folder = tmp_path_factory.mktemp("keras2")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", _WRITE_KERAS2_FILES, str(folder)], check=True, env=env, timeout=300)
    return folder


def test_keras2_h5_converts(keras2_files):
    fcn = kfs.convert(keras2_files / "legacy.h5")
    assert tuple(fcn(random_images((1, 28, 28, 3))).shape) == (1, 5, 5, 3)


def test_keras2_saved_model_folder_says_how_to_get_a_model_file(keras2_files, tmp_path, capsys):
    folder = keras2_files / "saved_model"
    with pytest.raises(kfs.ModelFileError, match=r"Keras 2 SavedModel.*tf_keras\.models\.load_model.*\.h5"):
        kfs.load_model(folder)
    output = tmp_path / "fcn.keras"
    assert main(["convert", str(folder), str(output)]) == EXIT_USAGE
    assert "tf_keras" in capsys.readouterr().err and not output.exists()


def test_other_folders_say_what_they_are(tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "saved_model.pb").write_bytes(b"")
    with pytest.raises(kfs.ModelFileError, match=r"TensorFlow SavedModel folder.*\.keras"):
        kfs.load_model(exported)
    with pytest.raises(kfs.ModelFileError, match=r"is a folder\. Give a `\.keras` or `\.h5` model file"):
        kfs.load_model(tmp_path)


@pytest.mark.heavy
def test_untrained_mobilenet_v2_is_checked_on_its_logits():
    """The issue's case: its probabilities are the same for every input (1/1000), its logits are not."""
    source = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    fcn = kfs.convert(source)
    images = random_images((2, 96, 96, 3))
    probabilities = np.asarray(source(images))
    assert np.ptp(probabilities, axis=0).max() < 1e-6 * np.abs(probabilities).max()
    result = kfs.verify(source, fcn)
    assert result.compared == "logits of 'predictions'" and result.informative
    predictions = fcn.get_layer("predictions")
    predictions.kernel.assign(np.asarray(predictions.kernel) * 1.01)
    assert np.allclose(np.asarray(fcn(images)).reshape(probabilities.shape), probabilities, rtol=1e-6)
    assert not kfs.verify(source, fcn).passed


def test_a_model_built_with_a_list_of_inputs_verifies_without_keras_structure_warnings():
    # Issue 23: Keras 2 files load as `keras.Model([x], [y])`; verification called them with a bare tensor.
    import warnings

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model([inputs], [keras.layers.Dense(2, activation="softmax")(x)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fcn = kfs.convert(model)
    assert not [w for w in caught if "structure" in str(w.message)], [str(w.message) for w in caught]
    assert kfs.verify(model, fcn).passed
