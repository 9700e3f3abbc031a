"""`keras.ops` operations in model graphs (issue 9): body, head, geometry, size-bound layers.

Keras 3 records ``x + 3.0``, ``ops.relu(x)``, ``ops.pad``, ``ops.split`` and
the like as `Operation` nodes that are not layers. Each test here failed on the
landed main with a raw ``AttributeError`` or a silently wrong geometry.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_images
from keras import layers, ops

import keras_fcn_surgery as kfs

ATOL = 2e-5


def _shape(size, channels, data_format):
    return (*size, channels) if data_format == "channels_last" else (channels, *size)


def _ops_body(x, data_format):
    """Operations in the body: arithmetic with constants, an activation, a pad, a split and a concatenate."""
    channel_axis = -1 if data_format == "channels_last" else 1
    x = x * 0.5 + 3.0
    x = ops.relu6(x) / 6.0
    pads = [[0, 0], [1, 2], [2, 1], [0, 0]] if data_format == "channels_last" else [[0, 0], [0, 0], [1, 2], [2, 1]]
    x = ops.pad(x, pads)
    first, second = ops.split(x, 2, axis=channel_axis)
    x = ops.concatenate([second, ops.sigmoid(first)], axis=channel_axis)
    return layers.Conv2D(8, 3, strides=2, data_format=data_format, name="conv2")(x)


def _ops_model(data_format="channels_last", head="flatten"):
    inputs = keras.Input(_shape((20, 18), 3, data_format))
    x = layers.Conv2D(6, 3, data_format=data_format, name="conv1")(inputs)
    x = _ops_body(x, data_format)
    if head == "flatten":
        x = layers.Flatten(data_format=data_format)(x)
        x = ops.relu(x * 2.0)
    else:
        x = layers.GlobalAveragePooling2D(data_format=data_format)(x)
    x = layers.Dense(10, name="fc")(x)
    scale = np.linspace(0.5, 1.5, 10).astype("float32")
    x = x * scale - 1.0  # a per-feature vector: on a channels-first map it must lie along axis 1
    x = ops.tanh(x) + ops.mean(x, axis=-1, keepdims=True)
    return keras.Model(inputs, ops.softmax(x, axis=-1))


def _equivalent_layers_model(data_format="channels_last"):
    """The same grid as `_ops_model`'s body, written with layers only."""
    inputs = keras.Input(_shape((None, None), 3, data_format))
    x = layers.Conv2D(6, 3, data_format=data_format)(inputs)
    x = layers.ZeroPadding2D(((1, 2), (2, 1)), data_format=data_format)(x)
    return keras.Model(inputs, layers.Conv2D(8, 3, strides=2, data_format=data_format)(x))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_operations_in_body_and_head_convert_and_map(data_format, head):
    source = _ops_model(data_format, head)
    fcn = kfs.convert(source)  # verifies at the original size
    grid = kfs.geometry(fcn)
    assert grid.exact, grid.unknown
    assert grid.stride == (2, 2)
    image = random_images(_shape((37, 29), 3, data_format), seed=3)
    scores = kfs.predict_map(fcn, image)
    np.testing.assert_allclose(scores, np.asarray(fcn(image[None]))[0], atol=ATOL)
    spatial = scores.shape[:2] if data_format == "channels_last" else scores.shape[1:]
    assert tuple(spatial) == grid.output_size((37, 29))
    # The softmax runs over the classes of each cell.
    channel_axis = -1 if data_format == "channels_last" else 0
    np.testing.assert_allclose(scores.sum(axis=channel_axis), 1.0, atol=1e-5)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_pad_split_and_concatenate_operations_are_geometry(data_format):
    """`ops.pad` moves the offset and widens the map exactly like ZeroPadding2D."""
    fcn = kfs.convert(_ops_model(data_format, "gap"), head="dense")
    body = kfs.geometry(_equivalent_layers_model(data_format), input_size=(20, 18))
    grid = kfs.geometry(fcn, input_size=(20, 18))
    assert (grid.stride, grid.receptive_field, grid.offset) == (body.stride, body.receptive_field, body.offset)
    assert grid.output_size((31, 40)) == body.output_size((31, 40))


def test_strided_slice_is_a_stride():
    inputs = keras.Input((None, None, 2))
    x = layers.Conv2D(3, 3, name="conv")(inputs)
    sliced = keras.Model(inputs, x[:, 1::2, ::3, :])
    x = layers.Conv2D(3, 3, name="conv")(inputs)
    x = layers.Cropping2D(((1, 0), (0, 0)))(x)
    pooled = keras.Model(inputs, layers.MaxPooling2D(1, strides=(2, 3))(x))
    for size in [(9, 9), (12, 17), (30, 31)]:
        a, b = kfs.geometry(sliced, input_size=size), kfs.geometry(pooled, input_size=size)
        assert (a.stride, a.receptive_field, a.offset) == (b.stride, b.receptive_field, b.offset)
        assert a.output_size(size) == tuple(sliced(random_images((1, *size, 2))).shape[1:3])


@pytest.mark.parametrize(
    "head_operation, fragment",
    [
        (lambda x: ops.reshape(x, (-1, 2, 5)), "'reshape' (Reshape)"),
        (lambda x: ops.mean(x, axis=-1), "keepdims=True"),
        (lambda x: ops.cumsum(x, axis=0), "'cumsum' (Cumsum)"),
        (lambda x: x + np.ones((3, 10), "float32"), "broadcasts"),
    ],
    ids=["reshape", "mean-no-keepdims", "cumsum-over-batch", "broadcast"],
)
def test_operations_that_would_mix_windows_are_refused_by_name(head_operation, fragment):
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(4, 3)(inputs)
    x = layers.GlobalMaxPooling2D(name="gmp")(x)
    model = keras.Model(inputs, head_operation(layers.Dense(10, name="fc")(x)))
    with pytest.raises(kfs.ConversionError, match="gmp") as info:
        kfs.convert(model)
    # Keras numbers an operation's name by how many of its kind the process made before ('cumsum_2'): the test's
    # neighbours in an xdist worker decide that, so the number is dropped before comparing.
    assert fragment in re.sub(r"'([a-z_]+?)_\d+' \(", r"'\1' (", str(info.value))


def test_operation_mixing_head_and_map_is_refused():
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    pooled = layers.GlobalAveragePooling2D(name="gap")(x)
    # `ops.std` over the map is no pooling the FCN can have (`ops.mean` would be: a window pooling).
    model = keras.Model(inputs, layers.Dense(4)(pooled) + ops.std(x, axis=(1, 2)))
    with pytest.raises(kfs.ConversionError, match="'add(_\\d+)?' \\(Add\\) mixes"):
        kfs.convert(model)


# Layers the geometry does not know ---------------------------------------------


@keras.saving.register_keras_serializable("kfs_tests")
class StridedBlock(layers.Layer):
    """A keras-hub-like block: sub-layers with strided convolutions, written with keras.ops (traceable)."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.pad = layers.ZeroPadding2D(1)
        self.conv = layers.Conv2D(filters, 3, strides=2)
        self.depthwise = layers.DepthwiseConv2D(5, padding="same")

    def call(self, x):
        return ops.relu(self.depthwise(self.conv(self.pad(x)))) + 1.0

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable("kfs_tests")
class OpaquePool(layers.Layer):
    """A layer written with TensorFlow itself: its call cannot be traced into Keras layers or operations."""

    def call(self, x):
        return tf.nn.avg_pool2d(x, 3, 2, "VALID")

    def compute_output_shape(self, shape):
        size = [None if d is None else (d - 3) // 2 + 1 for d in shape[1:3]]
        return (shape[0], *size, shape[3])


def _custom_model(block, size=(33, 33)):
    inputs = keras.Input((*size, 3))
    x = layers.Conv2D(4, 3, name="stem")(inputs)
    x = block(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3)(x))


def test_a_traceable_custom_block_has_an_exact_geometry():
    fcn = kfs.convert(_custom_model(StridedBlock(name="block")), head="dense")
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(4, 3)(inputs)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(4, 3, strides=2)(x)
    flat = keras.Model(inputs, layers.DepthwiseConv2D(5, padding="same")(x))
    for size in [(33, 33), (40, 51)]:
        a, b = kfs.geometry(fcn, input_size=size), kfs.geometry(flat, input_size=size)
        assert a.exact and (a.stride, a.receptive_field, a.offset) == (b.stride, b.receptive_field, b.offset)


def test_a_layer_without_a_known_window_is_reported_and_never_guessed():
    fcn = kfs.convert(_custom_model(OpaquePool(name="opaque")), head="dense")
    grid = kfs.geometry(fcn)
    assert not grid.exact and "'opaque' (OpaquePool)" in grid.unknown[0]
    assert grid.stride == (2, 2)  # read from its output sizes
    image = random_images((45, 38, 3))
    expected = np.asarray(fcn(image[None]))[0]
    assert expected.shape[:2] == grid.output_size((45, 38))  # sizes are exact: asked of the layer
    np.testing.assert_allclose(kfs.predict_map(fcn, image), expected, atol=ATOL)  # untiled, correct
    with pytest.raises(kfs.ConversionError, match="'opaque' \\(OpaquePool\\)"):
        kfs.predict_map(fcn, image, tile=16)
    with pytest.raises(kfs.ConversionError, match="'opaque' \\(OpaquePool\\)"):
        _ = grid.receptive_field
    assert "unknown" in str(grid)


# Size-bound layers are named --------------------------------------------------


@keras.saving.register_keras_serializable("kfs_tests")
class PositionEmbedding(layers.Layer):
    """Adds a learned (1, H, W, C) embedding: fits only one map size."""

    def build(self, shape):
        self.embedding = self.add_weight(shape=(1, *shape[1:]), initializer="random_normal")

    def call(self, x):
        return x + self.embedding


@keras.saving.register_keras_serializable("kfs_tests")
class StaticSizeTokens(layers.Layer):
    """Reads the map's static size in Python (MiT's patch embedding does): fails on None x None."""

    def call(self, x):
        return ops.reshape(x, (-1, x.shape[1], x.shape[2] * x.shape[3]))[..., None] * 1.0

    def compute_output_shape(self, shape):
        return (shape[0], shape[1], shape[2] * shape[3], 1)


@keras.saving.register_keras_serializable("kfs_tests")
class Tokens(layers.Layer):
    """Patches to tokens, with a class token prepended (ViT)."""

    def build(self, shape):
        self.class_token = self.add_weight(shape=(1, 1, shape[-1]), initializer="zeros")

    def call(self, x):
        tokens = ops.reshape(x, (ops.shape(x)[0], -1, x.shape[-1]))
        return ops.concatenate([ops.tile(self.class_token, (ops.shape(x)[0], 1, 1)), tokens], axis=1)


def test_a_map_sized_weight_is_named():
    with pytest.raises(kfs.ConversionError, match="'position' \\(PositionEmbedding\\).*larger"):
        kfs.convert(_custom_model(PositionEmbedding(name="position")))


def test_a_layer_reading_static_sizes_is_named():
    with pytest.raises(kfs.ConversionError, match="'static' \\(StaticSizeTokens\\).*unknown height and width"):
        kfs.convert(_custom_model(StaticSizeTokens(name="static")), head="dense")


def test_turning_the_map_into_tokens_is_named():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 4, strides=4, name="patches")(inputs)
    x = Tokens(name="tokens")(x)
    x = layers.MultiHeadAttention(2, 4, name="attention")(x, x)
    model = keras.Model(inputs, layers.Dense(3)(x[:, 0]))
    with pytest.raises(kfs.ConversionError, match="'tokens' \\(Tokens\\).*tokens"):
        kfs.convert(model)
