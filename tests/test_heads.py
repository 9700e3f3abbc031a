"""Global-pooling heads: window and dense semantics."""

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers
from models import valid_gap_cnn

import keras_fcn_surgery as kfs


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_window_cells_equal_the_classifier_on_crops(pooling):
    source = valid_gap_cnn(pooling=pooling)
    fcn = kfs.convert(source, head="window")
    grid = kfs.geometry(fcn, (24, 24))
    assert grid.stride == (4, 4) and grid.offset == (0, 0)
    image = random_images((45, 38, 3))
    scores = np.asarray(fcn(image[None]))[0]
    assert scores.shape[:2] == grid.output_size((45, 38)) == (6, 5)
    for i, j in [(0, 0), (5, 4), (2, 1), (4, 0)]:
        crop = image[i * 4 : i * 4 + 24, j * 4 : j * 4 + 24]
        expected = np.asarray(source(crop[None]))[0]
        np.testing.assert_allclose(scores[i, j], expected, rtol=1e-5, atol=1e-6)


def test_dense_head_averaged_over_a_native_window_equals_window_head():
    source = valid_gap_cnn(softmax=False)
    window = kfs.convert(source, head="window")
    dense = kfs.convert(source, head="dense", verify=False)
    image = random_images((1, 40, 44, 3))
    dense_map = np.asarray(dense(image))
    window_map = np.asarray(window(image))
    feature_size = source.get_layer("gap").input.shape[1:3]  # 4 x 4 at 24 x 24
    averaged = np.asarray(keras.layers.AveragePooling2D(tuple(feature_size), strides=1)(dense_map))
    assert averaged.shape == window_map.shape
    np.testing.assert_allclose(averaged, window_map, rtol=1e-5, atol=1e-6)


def test_dense_head_runs_the_classifier_at_every_feature_position():
    source = valid_gap_cnn(softmax=False)
    dense = kfs.convert(source, head="dense", verify=False)
    features = keras.Model(source.inputs[0], source.get_layer("pool2").output)
    image = random_images((1, 24, 24, 3))
    feature_map = np.asarray(features(image))
    logits = source.get_layer("logits")
    expected = feature_map @ np.asarray(logits.kernel) + np.asarray(logits.bias)
    np.testing.assert_allclose(np.asarray(dense(image)), expected, rtol=1e-5, atol=1e-6)
    grid = kfs.geometry(dense, (24, 24))
    assert grid.output_size((24, 24)) == (4, 4)


def test_keepdims_pooling_with_pointwise_conv_and_flatten():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = layers.GlobalMaxPooling2D(keepdims=True)(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Conv2D(5, 1, name="classifier")(x)
    x = layers.Flatten()(x)
    outputs = layers.Activation("softmax")(layers.LayerNormalization()(layers.Dense(5)(x)))
    source = keras.Model(inputs, outputs)
    for head in kfs.HEADS:
        fcn = kfs.convert(source, head=head, verify=head == "window")
        scores = fcn(random_images((1, 24, 24, 3)))
        assert tuple(scores.shape) == (1, *kfs.geometry(fcn, (16, 16)).output_size((24, 24)), 5)


def test_channels_first_global_pooling_head():
    inputs = keras.Input((3, 20, 20))
    x = layers.Conv2D(6, 3, strides=2, data_format="channels_first")(inputs)
    x = layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    x = layers.BatchNormalization()(x)
    source = keras.Model(inputs, layers.Dense(4, activation="softmax")(x))
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    scores = np.asarray(fcn(random_images((1, 3, 30, 28))))
    assert scores.shape == (1, 4, 6, 5)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_unsupported_global_pooling_head_names_the_layer():
    inputs = keras.Input((16, 16, 3))
    pooled = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Reshape((2, 4), name="regroup")(pooled)))
    with pytest.raises(kfs.ConversionError, match="'regroup' \\(Reshape\\)"):
        kfs.convert(model)
    normalized = layers.Normalization(axis=None, name="scalar_norm")(pooled)
    with pytest.raises(kfs.ConversionError, match="'scalar_norm'"):
        kfs.convert(keras.Model(inputs, normalized))


def test_plan_lists_the_pooling_for_each_head():
    source = valid_gap_cnn()
    window = {r.layer_name: r for r in kfs.plan(source).rewrites}
    assert window["gap"].new_class == "AveragePooling2D" and window["gap"].detail == "pool 4x4, stride 1"
    assert window["logits"].new_shapes[0] == (1, 1, 16, 4)
    dense = {r.layer_name: r for r in kfs.plan(source, head="dense").rewrites}
    assert dense["gap"].new_class == "(removed)"
    assert "gap" in str(kfs.plan(source)) and "AveragePooling2D" in str(kfs.plan(source))


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_dense_head_converts_with_verification(pooling):
    # Found by the fuzz tests: `convert(model, head="dense")` always failed its own
    # verification (a map of 4 x 4 cells cannot be compared with one vector).
    source = valid_gap_cnn(pooling=pooling)
    dense = kfs.convert(source, head="dense")
    assert tuple(dense(random_images((1, 24, 24, 3))).shape) == (1, 4, 4, 4)
    assert kfs.verify(source, dense, head="dense").passed
    with pytest.raises(kfs.ConversionError, match="head='dense'"):
        kfs.verify(source, dense)


def test_bfloat16_window_pooling_stays_within_tolerance():
    # Found by the fuzz campaign: a bfloat16 AveragePooling2D over the whole 21x19 map drifted past the
    # tolerance once LayerNormalization amplified it; the window pooling now computes in float32.
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inner = keras.Sequential(
            [
                keras.Input((22, 21, 4)),
                layers.Cropping2D(((1, 0), (2, 0))),
                layers.GlobalAveragePooling2D(name="pool"),
                layers.Dense(5, activation="relu", use_bias=False),
                layers.LayerNormalization(),
                layers.Dense(3, use_bias=False),
                layers.LayerNormalization(),
                layers.Dense(3, use_bias=False),
            ]
        )
    finally:
        keras.config.set_dtype_policy("float32")
    model = keras.Sequential([keras.Input((22, 21, 4)), inner])
    rng = np.random.default_rng(65536)
    for variable in model.weights:
        if variable.name in ("beta", "gamma"):
            variable.assign(rng.normal(1.0 if variable.name == "gamma" else 0.0, 0.3, variable.shape))
    for head in kfs.HEADS:
        fcn = kfs.convert(model, head=head)
        assert kfs.verify(model, fcn, head=head).passed
    pooling = kfs.convert(model, verify=False).get_layer(inner.name).get_layer("pool")
    assert pooling.compute_dtype == "float32"


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_a_per_feature_prelu_between_head_dense_layers_is_shared_over_the_map(data_format):
    # Issue 23: mtcnn's RNet/ONet heads (Dense, PReLU, Dense) were refused.
    shape = (10, 10, 3) if data_format == "channels_last" else (3, 10, 10)
    inputs = keras.Input(shape)
    x = layers.Flatten()(layers.Conv2D(4, 3, strides=2, data_format=data_format)(inputs))
    x = layers.PReLU(alpha_initializer=keras.initializers.RandomUniform(-1, 1), name="prelu")(layers.Dense(8)(x))
    source = keras.Model(inputs, layers.Dense(3)(x))
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    prelu = fcn.get_layer("prelu")
    assert prelu.alpha.shape == ((1, 1, 8) if data_format == "channels_last" else (8, 1, 1))
    image = random_images((16, 14, 3) if data_format == "channels_last" else (3, 16, 14))
    expected = kfs.sliding_window_predict(source, image, 2)  # the classifier on every window, stride 2
    got = np.asarray(fcn(image[None]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("data_format", "keepdims", "shared"),
    [("channels_last", True, False), ("channels_first", True, False), ("channels_last", False, True)],
)
def test_a_prelu_on_a_pooled_head_or_with_one_shared_slope_carries_over(data_format, keepdims, shared):
    # A Dense on the 1 x 1 map of a keepdims pooling, then a PReLU (alpha (1, 1, F)), and a PReLU whose one
    # slope is shared by every feature (alpha (1,)): both were refused by name (fuzz campaign, issue 23).
    shape = (10, 10, 3) if data_format == "channels_last" else (3, 10, 10)
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, data_format=data_format)(inputs)
    x = layers.GlobalAveragePooling2D(data_format=data_format, keepdims=keepdims)(x)
    x = layers.Dense(6)(x) if not keepdims or data_format == "channels_last" else x
    prelu = layers.PReLU(
        alpha_initializer=keras.initializers.RandomUniform(-1, 1),
        shared_axes=[1] if shared else ([2, 3] if keepdims and data_format == "channels_first" else None),
        name="prelu",
    )
    source = keras.Model(inputs, layers.Dense(3)(layers.Flatten()(prelu(x))))
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    image = random_images((13, 12, 3) if data_format == "channels_last" else (3, 13, 12))
    expected = kfs.sliding_window_predict(source, image, 1)
    got = np.asarray(fcn(image[None]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("data_format", "dims"), [("channels_last", (2, 1, 3)), ("channels_last", (3, 2, 1)), ("channels_first", (1, 3, 2))]
)
def test_a_permute_before_the_flatten_folds_into_the_dense_kernel(data_format, dims):
    # Issue 23: mtcnn's RNet/ONet swap height and width before flattening; it was refused.
    shape = (11, 9, 3) if data_format == "channels_last" else (3, 11, 9)
    inputs = keras.Input(shape)
    x = layers.Conv2D(4, 3, strides=2, data_format=data_format, name="conv")(inputs)
    x = layers.Flatten(name="flatten")(layers.Permute(dims, name="permute")(x))
    source = keras.Model(inputs, layers.Dense(3, name="fc")(layers.Dense(6, name="fc1")(x)))
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    assert "permute" in str(kfs.plan(source)) and not any(isinstance(layer, layers.Permute) for layer in fcn.layers)
    image = random_images((17, 15, 3) if data_format == "channels_last" else (3, 17, 15))
    expected = kfs.sliding_window_predict(source, image, 2)  # the classifier on every window
    got = np.asarray(fcn(image[None]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


def test_a_permute_that_feeds_more_than_a_flatten_is_still_refused_by_name():
    inputs = keras.Input((8, 8, 3))
    x = layers.Permute((2, 1, 3), name="swap")(layers.Conv2D(4, 3)(inputs))
    x = layers.Flatten()(layers.Conv2D(2, 3)(x))
    with pytest.raises(kfs.ConversionError, match="'swap'.*Permute is folded only where Flatten"):
        kfs.convert(keras.Model(inputs, layers.Dense(2)(x)))
