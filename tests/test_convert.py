"""`convert` on Flatten + Dense classifiers: shapes, weights, equivalence, files."""

import keras
import numpy as np
import pytest
from conftest import random_images
from keras import layers
from models import small_flatten_cnn

import keras_fcn_surgery as kfs
from keras_fcn_surgery.zoo import caffenet


@pytest.fixture(scope="module")
def caffenet_pair():
    source = caffenet()
    return source, kfs.convert(source)


def _sliding_outputs(source, image, stride, cells):
    size = source.input_shape[1]
    crops = np.stack([image[i * stride : i * stride + size, j * stride : j * stride + size] for i, j in cells])
    return np.asarray(source(crops, training=False))


def test_caffenet_fc6_becomes_a_6x6_convolution(caffenet_pair):
    source, fcn = caffenet_pair
    fc6 = fcn.get_layer("fc6")
    assert isinstance(fc6, layers.Conv2D)
    assert tuple(fc6.kernel.shape) == (6, 6, 256, 4096)
    assert fc6.padding == "valid"
    assert fc6.count_params() == 37_752_832
    for name in ("fc7", "fc8"):
        assert isinstance(fcn.get_layer(name), layers.Conv2D)
        assert tuple(fcn.get_layer(name).kernel_size) == (1, 1)
    np.testing.assert_array_equal(
        np.asarray(fc6.kernel).reshape(9216, 4096), np.asarray(source.get_layer("fc6").kernel)
    )


def test_caffenet_451_gives_an_8x8_map(caffenet_pair):
    _, fcn = caffenet_pair
    scores = np.asarray(fcn(random_images((1, 451, 451, 3))))
    assert scores.shape == (1, 8, 8, 1000)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)
    assert kfs.geometry(fcn).output_size((451, 451)) == (8, 8)


def test_valid_padding_map_cells_are_the_classifier_on_crops():
    source = keras.Sequential(
        [
            keras.Input((20, 20, 3)),
            layers.Conv2D(6, 5, strides=1, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(8, 3, strides=2, activation="relu"),
            layers.Flatten(),
            layers.Dense(10, activation="relu"),
            layers.Dense(4),
        ]
    )
    fcn = kfs.convert(source)
    grid = kfs.geometry(fcn)
    # The last two input rows of a 20-pixel window reach no output (floor division
    # in the stride-2 conv), so the receptive field is 18.
    assert grid.stride == (4, 4) and grid.receptive_field == (18, 18) and grid.offset == (0, 0)
    image = random_images((37, 45, 3))
    scores = np.asarray(fcn(image[None]))[0]
    assert scores.shape[:2] == grid.output_size((37, 45)) == (5, 7)
    cells = [(0, 0), (2, 3), (4, 6), (1, 5)]
    expected = _sliding_outputs(source, image, 4, cells)
    got = np.stack([scores[i, j] for i, j in cells])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_caffenet_equals_source_at_227(caffenet_pair):
    source, fcn = caffenet_pair
    result = kfs.verify(source, fcn)
    assert result.passed
    assert result.input_shape == (2, 227, 227, 3)
    assert result.max_rel_diff < 1e-5


def test_result_has_relaxed_input_and_keeps_layer_settings():
    source = small_flatten_cnn()
    source.get_layer("fc1").kernel_regularizer = keras.regularizers.L2(0.01)
    fcn = kfs.convert(source)
    assert tuple(fcn.input_shape) == (None, None, None, 3)
    assert fcn.input_shape == (None, None, None, 3)
    assert fcn.layers[0].name == "image"
    fc1 = fcn.get_layer("fc1")
    assert fc1.activation is keras.activations.relu
    assert isinstance(fc1.kernel_regularizer, keras.regularizers.L2)
    assert fcn.get_layer("fc2").activation is keras.activations.softmax
    # The Dropout is the identity at inference: the FCN (and every file exported from it) leaves it out.
    assert [layer.name for layer in fcn.layers] == ["image", "conv1", "pool1", "conv2", "fc1", "fc2"]


def test_source_is_left_untouched():
    source = small_flatten_cnn()
    before = [np.array(w) for w in source.get_weights()]
    layer_names = [layer.name for layer in source.layers]
    image = random_images((1, 32, 32, 3))
    expected = np.asarray(source(image))
    fcn = kfs.convert(source)
    for weight in fcn.weights:
        weight.assign(np.zeros(weight.shape, dtype=weight.dtype))
    assert [layer.name for layer in source.layers] == layer_names
    assert source.input_shape == (None, 32, 32, 3)
    for old, new in zip(before, source.get_weights()):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(np.asarray(source(image)), expected)


def test_larger_input_gives_the_map_of_windows():
    source = small_flatten_cnn()
    fcn = kfs.convert(source)
    image = random_images((48, 56, 3))
    scores = np.asarray(fcn(image[None]))[0]
    grid = kfs.geometry(fcn, (32, 32))
    assert scores.shape[:2] == grid.output_size((48, 56))
    assert grid.stride == (4, 4)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "data_format, flatten_format",
    [("channels_first", "channels_first"), ("channels_first", "channels_last"), ("channels_last", "channels_first")],
)
def test_channels_first_and_mismatched_flatten(data_format, flatten_format):
    source = small_flatten_cnn(data_format=data_format, flatten_format=flatten_format)
    fcn = kfs.convert(source)
    result = kfs.verify(source, fcn)
    assert result.passed, result
    shape = (1, 3, 40, 36) if data_format == "channels_first" else (1, 40, 36, 3)
    scores = np.asarray(fcn(random_images(shape)))
    expected_map = kfs.geometry(fcn, (32, 32)).output_size((40, 36))
    if data_format == "channels_first":
        assert scores.shape == (1, 5, *expected_map)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)  # softmax over channels
    else:
        assert scores.shape == (1, *expected_map, 5)


def test_fc1_kernel_layout_matches_numpy_for_mismatched_flatten():
    """Independent check: rebuild the conv kernel from the Dense rows by hand."""
    source = small_flatten_cnn(data_format="channels_first", flatten_format="channels_last")
    fcn = kfs.convert(source)
    dense_kernel = np.asarray(source.get_layer("fc1").kernel)
    pre_flatten = source.get_layer("conv2").output.shape  # (None, C, H, W)
    channels, height, width = pre_flatten[1:]
    # A channels_last Flatten of a (C, H, W) tensor reads rows in C, H, W order.
    expected = dense_kernel.reshape(channels, height, width, -1).transpose(1, 2, 0, 3)
    np.testing.assert_array_equal(np.asarray(fcn.get_layer("fc1").kernel), expected)


def test_batchnorm_and_dropout_between_dense_layers():
    source = keras.Sequential(
        [
            keras.Input((20, 20, 3)),
            layers.Conv2D(6, 5, strides=2, activation="relu"),
            layers.Flatten(),
            layers.Dense(12),
            layers.BatchNormalization(name="bn"),
            layers.Activation("relu"),
            layers.Dropout(0.3),
            layers.Dense(7),
            layers.LayerNormalization(name="ln"),
            layers.Dense(3, activation="softmax"),
        ]
    )
    bn = source.get_layer("bn")
    bn.moving_mean.assign(np.random.default_rng(0).standard_normal(12))
    bn.moving_variance.assign(np.random.default_rng(1).uniform(0.5, 2, 12))
    fcn = kfs.convert(source)
    assert isinstance(fcn.get_layer("bn"), layers.BatchNormalization)
    assert kfs.verify(source, fcn).passed
    assert fcn(random_images((1, 30, 30, 3))).shape == (1, 6, 6, 3)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("data_format, flatten_format", [("channels_last", None), ("channels_first", "channels_last")])
def test_batchnorm_of_flattened_features_is_folded_into_the_dense(use_bias, data_format, flatten_format):
    shape = (18, 18, 3) if data_format == "channels_last" else (3, 18, 18)
    source = keras.Sequential(
        [
            keras.Input(shape),
            layers.Conv2D(5, 3, strides=2, activation="relu", data_format=data_format),
            layers.Flatten(data_format=flatten_format or data_format),
            layers.BatchNormalization(name="flat_bn"),
            layers.Dropout(0.2),
            layers.Dense(6, use_bias=use_bias, name="fc"),
            layers.Dense(3, activation="softmax"),
        ]
    )
    bn = source.get_layer("flat_bn")
    rng = np.random.default_rng(5)
    features = bn.moving_mean.shape[0]
    bn.moving_mean.assign(rng.standard_normal(features))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, features))
    bn.gamma.assign(rng.standard_normal(features))
    bn.beta.assign(rng.standard_normal(features))
    plan = {r.layer_name: r for r in kfs.plan(source).rewrites}
    assert plan["flat_bn"].new_class == "(folded)" and "flat_bn folded in" in plan["fc"].detail
    fcn = kfs.convert(source)
    assert "flat_bn" not in [layer.name for layer in fcn.layers]
    assert fcn.get_layer("fc").use_bias
    result = kfs.verify(source, fcn)
    assert result.passed and result.max_rel_diff < 1e-5, result
    larger = (1, 26, 22, 3) if data_format == "channels_last" else (1, 3, 26, 22)
    assert np.asarray(fcn(random_images(larger))).size == 3 * 5 * 3


def test_functional_model_with_branches_before_flatten():
    inputs = keras.Input((16, 16, 3))
    stem = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    left = layers.Conv2D(8, 3, padding="same")(stem)
    right = layers.Conv2D(8, 1)(stem)
    added = layers.Add()([left, right])
    concat = layers.Concatenate()([added, layers.MaxPooling2D(1)(stem)])
    pooled = layers.MaxPooling2D(2)(concat)
    outputs = layers.Dense(4)(layers.Dense(10, activation="relu")(layers.Flatten()(pooled)))
    source = keras.Model(inputs, outputs)
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    assert fcn(random_images((2, 24, 20, 3))).shape == (2, 5, 3, 4)


def test_multiple_outputs_and_head_branches():
    inputs = keras.Input((12, 12, 3))
    features = layers.Flatten()(layers.Conv2D(4, 3, strides=2)(inputs))
    hidden = layers.Dense(8, activation="relu")(features)
    a = layers.Dense(3, name="a")(hidden)
    b = layers.Dense(3, name="b")(layers.Dense(6)(features))
    merged = layers.Concatenate(name="concat")([layers.Add()([a, b]), a])
    source = keras.Model(inputs, [merged, layers.Softmax()(a)])
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    first, second = fcn(random_images((1, 16, 16, 3)))
    assert first.shape == (1, 3, 3, 6) and second.shape == (1, 3, 3, 3)


def test_nested_transfer_learning_stack():
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    source = keras.Sequential(
        [
            base,
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(5, activation="softmax"),
        ]
    )
    fcn = kfs.convert(source)
    assert isinstance(fcn.get_layer("vgg16"), keras.Model)
    assert fcn.get_layer("vgg16").input_shape == (None, None, None, 3)
    assert tuple(fcn.layers[-2].kernel.shape) == (2, 2, 512, 32)  # the Dropout, the identity at inference, left out
    assert kfs.verify(source, fcn).passed
    assert fcn(random_images((1, 128, 96, 3))).shape == (1, 3, 2, 5)


def test_doubly_nested_head():
    body = keras.Sequential([keras.Input((16, 16, 3)), layers.Conv2D(4, 3, strides=2)], name="body")
    head = keras.Sequential([keras.Input((7, 7, 4)), layers.Flatten(), layers.Dense(6)], name="head")
    inner = keras.Sequential([keras.Input((16, 16, 3)), body, head], name="inner")
    inputs = keras.Input((16, 16, 3))
    source = keras.Model(inputs, layers.Dense(2)(inner(inputs)))
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    assert fcn(random_images((1, 20, 20, 3))).shape == (1, 3, 3, 2)


def test_shared_body_layer_stays_shared():
    inputs = keras.Input((12, 12, 3))
    shared = layers.Conv2D(3, 3, padding="same", name="shared")
    x = shared(shared(inputs))
    source = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    fcn = kfs.convert(source)
    assert kfs.verify(source, fcn).passed
    assert sum(layer.name == "shared" for layer in fcn.layers) == 1


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_models_loaded_from_files(tmp_path, suffix):
    source = small_flatten_cnn()
    path = tmp_path / f"model{suffix}"
    source.save(path)
    fcn = kfs.convert(str(path))
    assert kfs.verify(source, fcn).passed


def test_round_trip_through_keras_file(tmp_path):
    fcn = kfs.convert(small_flatten_cnn())
    path = tmp_path / "fcn.keras"
    fcn.save(path)
    loaded = keras.models.load_model(path)
    image = random_images((2, 44, 52, 3))
    np.testing.assert_array_equal(np.asarray(loaded(image)), np.asarray(fcn(image)))
    builtin = {cls.__module__.split(".")[0] for cls in map(type, loaded.layers)}
    assert builtin == {"keras"}


def test_already_convolutional_model_is_relaxed_only():
    source = keras.Sequential([keras.Input((16, 16, 3)), layers.Conv2D(4, 3), layers.Conv2D(2, 1)])
    assert kfs.plan(source).rewrites == ()
    fcn = kfs.convert(source)
    assert fcn(random_images((1, 20, 20, 3))).shape == (1, 18, 18, 2)


def test_models_of_any_size_need_input_size():
    inputs = keras.Input((None, None, 3))
    source = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(inputs))))
    with pytest.raises(kfs.ConversionError, match="input_size"):
        kfs.convert(source)
    fcn = kfs.convert(source, input_size=(10, 12))
    assert kfs.verify(source, fcn, input_size=(10, 12)).passed
    assert fcn(random_images((1, 10, 12, 3))).shape == (1, 1, 1, 3)


def test_verify_reports_a_wrong_model():
    source = small_flatten_cnn()
    fcn = kfs.convert(source)
    fc1 = fcn.get_layer("fc1")
    fc1.kernel.assign(np.asarray(fc1.kernel) * 1.01)
    result = kfs.verify(source, fcn)
    assert not result.passed
    assert result.max_abs_diff > 0 and result.max_rel_diff > result.tolerance


def test_verification_failure_raises(monkeypatch):
    import keras_fcn_surgery.surgery.convert as conversion

    def wrong_kernel(kernel, height, width, channels, axis_order):
        return keras.ops.reshape(kernel, (height, width, channels, -1)) * 2

    monkeypatch.setattr("keras_fcn_surgery.surgery.rules.flatten_dense.dense_to_conv_kernel", wrong_kernel)
    with pytest.raises(kfs.VerificationError, match="differs from the source"):
        conversion.convert(small_flatten_cnn())
