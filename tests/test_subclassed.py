"""Subclassed models convert: their `call` is traced into a functional graph of the same layers (issue 23)."""

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers

import keras_fcn_surgery as kfs


class ConvBlock(layers.Layer):
    """A custom layer holding layers: convolution, batch normalisation, then a `keras.ops` activation."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(filters, 3)
        self.norm = layers.BatchNormalization()

    def call(self, x):
        return keras.ops.relu(self.norm(self.conv(x))) * 0.5 + 0.25


class Body(keras.Model):
    """A subclassed model called by another one."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = ConvBlock(6)
        self.pool = layers.MaxPooling2D(2)

    def call(self, x):
        return self.pool(self.first(x))


class Classifier(keras.Model):
    """A nested subclassed body, `keras.ops` calls between layers, Flatten and two Dense layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = Body()
        self.conv = layers.Conv2D(8, 3, strides=2)
        self.flatten = layers.Flatten()
        self.hidden = layers.Dense(12, activation="relu")
        self.logits = layers.Dense(3)

    def call(self, inputs):
        x = keras.ops.tanh(self.conv(self.body(inputs)))
        return self.logits(self.hidden(self.flatten(x)))


def _classifier():
    model = Classifier()
    model(random_images((1, 20, 20, 3)))
    # Non-trivial normalisation statistics, so a trace that dropped the layer would be caught.
    norm = model.body.first.norm
    norm.moving_mean.assign(np.linspace(-0.5, 0.5, 6).astype("float32"))
    norm.moving_variance.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    return model


def _crops(model, image, stride, size, cells):
    windows = [image[None, i * stride : i * stride + size, j * stride : j * stride + size] for i, j in cells]
    return np.concatenate([np.asarray(model(window)) for window in windows])


def test_a_subclassed_model_converts_and_its_map_cells_are_the_model_on_crops():
    model = _classifier()
    fcn = kfs.convert(model)
    grid = kfs.geometry(model)
    assert grid.stride == (4, 4)
    image = random_images((37, 45, 3), seed=1)
    scores = np.asarray(fcn(image[None]))[0]
    assert scores.shape[:2] == grid.output_size((37, 45))
    cells = [(0, 0), (1, 2), (scores.shape[0] - 1, scores.shape[1] - 1)]
    expected = _crops(model, image, 4, 20, cells)
    got = np.stack([scores[i, j] for i, j in cells])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_conversion_shares_the_models_weights_not_a_random_copy():
    model = _classifier()
    fcn = kfs.convert(model)
    body_kernel = model.conv.kernel
    assert any(np.array_equal(np.asarray(w), np.asarray(body_kernel)) for w in fcn.weights)


def test_as_fcn_and_predict_map_take_a_subclassed_classifier():
    model = _classifier()
    image = random_images((40, 40, 3), seed=2)
    scores = kfs.predict_map(kfs.as_fcn(model), image)
    expected = _crops(model, image, 4, 20, [(0, 0), (5, 5)])
    np.testing.assert_allclose(scores[[0, 5], [0, 5]], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


class ConvDense(keras.Model):
    """Conv2D, Flatten, Dense: subclasses write `call`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3)
        self.flatten = layers.Flatten()
        self.dense = layers.Dense(2)


class Branching(ConvDense):
    def call(self, x):
        x = self.conv(x)
        if keras.ops.mean(x) > 0:  # data-dependent Python control flow: cannot be traced
            x = -x
        return self.dense(self.flatten(x))


def test_data_dependent_control_flow_is_refused_naming_the_line():
    model = Branching()
    model(random_images((1, 8, 8, 3)))
    with pytest.raises(kfs.ConversionError) as error:
        kfs.convert(model)
    message = str(error.value)
    assert "'branching' (Branching)" in message
    assert "test_subclassed.py" in message and "if keras.ops.mean(x) > 0" in message
    assert "keras.ops.where" in message


class Noisy(ConvDense):
    def call(self, x):
        # NumPy noise drawn at each call: a trace freezes one draw, so the twin is not the model.
        noise = np.random.default_rng().standard_normal((1, 6, 6, 4)).astype("float32")
        return self.dense(self.flatten(self.conv(x) + noise))


def test_a_trace_that_differs_from_the_call_is_refused_with_the_difference():
    model = Noisy()
    model(random_images((1, 8, 8, 3)))
    with pytest.raises(kfs.ConversionError, match=r"traced graph differs from its `call` \(max relative difference"):
        kfs.convert(model)


class Unbuilt(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_a_subclassed_model_of_unknown_input_shape_says_how_to_give_one():
    with pytest.raises(kfs.ConversionError, match=r"input shape is unknown.*model.build\(\(None, H, W, C\)\)"):
        kfs.convert(Unbuilt())


def test_a_functional_model_calling_a_subclassed_model_converts():
    body = Body()
    inputs = keras.Input((20, 20, 3))
    x = layers.Flatten()(body(inputs))
    model = keras.Model(inputs, layers.Dense(3)(x))
    fcn = kfs.convert(model)
    image = random_images((28, 24, 3), seed=3)
    scores = np.asarray(fcn(image[None]))[0]
    expected = _crops(model, image, 2, 20, [(0, 0), (4, 2)])
    got = np.stack([scores[0, 0], scores[4, 2]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


class MeanHead(keras.Model):
    """A head pooled with `keras.ops` (``ops.mean``/``ops.max`` over the spatial axes), as subclassed nets often do."""

    def __init__(self, reduction, keepdims, **kwargs):
        super().__init__(**kwargs)
        self.reduction, self.keepdims = reduction, keepdims
        self.conv = layers.Conv2D(5, 3, activation="relu")
        self.flatten = layers.Flatten()
        self.dense = layers.Dense(3)

    def call(self, x):
        pooled = getattr(keras.ops, self.reduction)(self.conv(x), axis=(1, 2), keepdims=self.keepdims)
        return self.dense(self.flatten(pooled) if self.keepdims else pooled)


@pytest.mark.parametrize("reduction, keepdims", [("mean", False), ("max", True)])
def test_a_head_pooled_with_keras_ops_becomes_a_window_pooling(reduction, keepdims):
    model = MeanHead(reduction, keepdims)
    model(random_images((1, 12, 12, 3)))
    fcn = kfs.convert(model)
    assert any(isinstance(layer, (layers.AveragePooling2D, layers.MaxPooling2D)) for layer in fcn.layers)
    image = random_images((17, 15, 3), seed=4)
    scores = np.asarray(fcn(image[None]))[0]
    assert scores.shape[:2] == (6, 4)
    cells = [(0, 0), (5, 3), (2, 1)]
    expected = _crops(model, image, 1, 12, cells)
    got = np.stack([scores[i, j] for i, j in cells])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
