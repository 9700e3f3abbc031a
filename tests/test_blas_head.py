"""A large-kernel head convolution run as blocked matrix products in numpy equals TensorFlow's."""

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers

import keras_fcn_surgery as kfs
from keras_fcn_surgery.inference import blas, engines


def _head_model(data_format="channels_last", activation="relu", branch=False, fc7_kernel=1):
    """conv + pooling, then a 5x5 "fc6" of 512 filters, a 1x1 "fc7", optionally a skip around fc6."""
    shape = (None, None, 2) if data_format == "channels_last" else (2, None, None)
    inputs = keras.Input(shape)
    x = layers.Conv2D(8, 3, strides=2, activation="relu", data_format=data_format)(inputs)
    x = layers.MaxPooling2D(2, data_format=data_format)(x)
    y = layers.Conv2D(512, 5, activation=activation, name="fc6", data_format=data_format)(x)
    if branch:  # a branch around fc6: the graph cannot be split at it
        y = layers.Concatenate(axis=-1 if data_format == "channels_last" else 1)(
            [y, layers.Cropping2D(2, data_format=data_format)(x)]
        )
    return keras.Model(inputs, layers.Conv2D(3, fc7_kernel, data_format=data_format, name="fc7")(y))


@pytest.mark.parametrize("relu", [False, True])
def test_valid_conv_equals_tensorflow(relu, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 13, 11, 5)).astype("float32")
    kernel = rng.standard_normal((4, 3, 5, 7)).astype("float32")
    bias = rng.standard_normal(7).astype("float32")
    expected = np.asarray(keras.ops.conv(x, kernel, padding="valid")) + bias
    if relu:
        expected = np.maximum(expected, 0)
    for block in (1 << 20, 3 * 9 * 5):  # one block of rows, then blocks of 3 rows (the last of 1)
        monkeypatch.setattr(blas, "_BLOCK_ELEMENTS", block)
        result = blas.valid_conv(x, kernel, bias, relu)
        np.testing.assert_allclose(result, expected, atol=1e-5 * np.abs(expected).max())
    assert blas.valid_conv(x, kernel, None, False).shape == (2, 10, 9, 7)
    assert blas.valid_conv(x[:, :3], kernel, None, False).shape == (2, 0, 9, 7)


@pytest.mark.parametrize("fc7_kernel", [1, 3])
def test_predict_map_runs_the_head_in_numpy_with_engine_blas_and_stays_exact(fc7_kernel, monkeypatch):
    calls = []
    real = blas.conv_row_blocks

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(blas, "conv_row_blocks", counted)
    monkeypatch.setattr(blas, "_BLOCK_ELEMENTS", 4 * 5 * 5 * 8)  # several blocks of rows per tile
    model = _head_model(fc7_kernel=fc7_kernel)  # fc7 1x1: run block by block; 3x3: on the whole map
    image = random_images((77, 69, 2), seed=4)
    whole = np.asarray(model(image[None], training=False))[0]
    scale = np.abs(whole).max()
    for options in ({}, {"tile": 44}, {"tile": 44, "staged": False}):
        calls.clear()
        result = kfs.predict_map(model, image, engine="blas", **options)
        np.testing.assert_allclose(result, whole, atol=1e-5 * scale, err_msg=str(options))
        assert calls, f"the head did not run in numpy with {options}"
    calls.clear()
    np.testing.assert_allclose(kfs.predict_map(model, image, engine="tf"), whole, atol=1e-5 * scale)
    np.testing.assert_allclose(kfs.predict_maps(model, [image, image], engine="blas")[1], whole, atol=1e-5 * scale)
    assert len(calls) == 1, "engine='tf' is TensorFlow only; predict_maps runs engines as predict_map"


def test_weights_changed_after_a_pass_are_used():
    model = _head_model(activation=None)
    image = random_images((45, 45, 2), seed=5)
    kfs.predict_map(model, image, engine="blas")
    fc6 = model.get_layer("fc6")
    fc6.kernel.assign(fc6.kernel * 2.0)
    fc6.bias.assign(fc6.bias + 1.0)
    whole = np.asarray(model(image[None], training=False))[0]
    np.testing.assert_allclose(kfs.predict_map(model, image, engine="blas"), whole, atol=1e-5 * np.abs(whole).max())


def test_heads_numpy_cannot_run_stay_in_tensorflow():
    def forward(m):
        return engines.forward(m, "tf")

    assert blas.split_forward(_head_model(branch=True), forward) is None
    assert blas.split_forward(_head_model(activation="tanh"), forward) is None
    assert blas.split_forward(_head_model(), forward) is not None
    assert blas.split_forward(_head_model(activation=None), forward) is not None
    for model in (_head_model(branch=True), _head_model(activation="tanh")):
        image = random_images((45, 45, 2), seed=6)
        whole = np.asarray(model(image[None], training=False))[0]
        np.testing.assert_allclose(kfs.predict_map(model, image), whole, atol=1e-5 * np.abs(whole).max())


def test_channels_first_heads_stay_in_tensorflow():
    model = _head_model("channels_first")
    assert blas.split_forward(model, lambda m: engines.forward(m, "tf")) is None


def _pointwise_rest_model(stop_numpy_at_batchnorm=False):
    """A large-kernel fc6, then a pointwise rest: dropout, 1x1 convolution, Dense, ReLU, softmax."""
    inputs = keras.Input((None, None, 2))
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(512, 5, activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Conv2D(64, 1, activation="relu", name="fc7")(x)
    if stop_numpy_at_batchnorm:  # numpy stops here; the rest runs in TensorFlow
        x = layers.BatchNormalization(beta_initializer="ones")(x)
    x = layers.Dense(16, name="fc7b")(x)
    x = layers.ReLU()(x)
    return keras.Model(inputs, layers.Conv2D(5, 1, activation="softmax", name="fc8")(x))


@pytest.mark.parametrize("stop_numpy_at_batchnorm", [False, True])
def test_a_pointwise_rest_runs_its_leading_layers_in_numpy(stop_numpy_at_batchnorm, monkeypatch):
    ran = []
    real = blas._cell_functions

    def recorded(steps):
        ran.append([kind for kind, _, _ in steps])
        return real(steps)

    monkeypatch.setattr(blas, "_cell_functions", recorded)
    monkeypatch.setattr(blas, "_BLOCK_ELEMENTS", 4 * 5 * 5 * 8)  # several blocks of rows per tile
    model = _pointwise_rest_model(stop_numpy_at_batchnorm)
    image = random_images((61, 57, 2), seed=7)
    whole = np.asarray(model(image[None], training=False))[0]
    for options in ({}, {"tile": 44}):
        ran.clear()
        result = kfs.predict_map(model, image, engine="blas", **options)
        np.testing.assert_allclose(result, whole, atol=1e-5 * np.abs(whole).max(), err_msg=str(options))
        expected = ["identity", "conv"]
        if not stop_numpy_at_batchnorm:
            expected += ["dense", "identity", "conv"]
        assert ran and all(kinds == expected for kinds in ran), ran
    # Weights changed after a pass are used by the numpy layers too.
    fc7 = model.get_layer("fc7")
    fc7.kernel.assign(fc7.kernel * -1.5)
    whole = np.asarray(model(image[None], training=False))[0]
    np.testing.assert_allclose(kfs.predict_map(model, image, engine="blas"), whole, atol=1e-5 * np.abs(whole).max())
    # Logits far past exp's float32 range: the softmax stays finite, as Keras's does.
    fc8 = model.get_layer("fc8")
    fc8.kernel.assign(fc8.kernel * 1e4)
    whole = np.asarray(model(image[None], training=False))[0]
    assert np.isfinite(whole).all()
    np.testing.assert_allclose(kfs.predict_map(model, image, engine="blas"), whole, atol=1e-5)


def test_cell_steps_refuse_what_numpy_does_not_run_as_keras_does():
    assert blas._cell_step(layers.ReLU(max_value=6.0)) is None
    assert blas._cell_step(layers.Activation("tanh")) is None
    assert blas._cell_step(layers.Conv2D(4, 3)) is None
    assert blas._cell_step(layers.Conv2D(4, 1, strides=2)) is None
    assert blas._cell_step(layers.Conv2D(4, 1, activation="gelu")) is None
    assert blas._cell_step(layers.Dense(4, dtype="mixed_float16")) is None
    assert blas._cell_step(layers.Softmax(axis=1)) is None
    assert blas._cell_step(layers.Conv2D(4, 1, activation="softmax"))[0] == "conv"
