"""The kernel reshaping functions against an independent NumPy computation."""

import itertools

import numpy as np
import pytest

from keras_fcn_surgery.surgery.kernels import (
    batch_norm_affine,
    dense_to_conv_kernel,
    dense_to_pointwise_kernel,
    flatten_axis_order,
    fold_affine_after_conv,
    fold_affine_into_dense,
    parameter_count,
)


def _dense_on_map(kernel, feature_map, flatten_order):
    """What Dense(Flatten(map)) computes, flattening the (H, W, C) map in the given axis order."""
    axes = ["h", "w", "c"]
    permuted = np.transpose(feature_map, [axes.index(a) for a in flatten_order])
    return permuted.reshape(-1) @ kernel


def _valid_conv_single_window(kernel, feature_map):
    """A valid conv whose kernel covers the whole (H, W, C) map: one output cell."""
    return np.einsum("hwc,hwcu->u", feature_map, kernel)


@pytest.mark.parametrize("order", list(itertools.permutations("hwc")))
def test_dense_to_conv_kernel_matches_dense_for_every_flatten_order(order):
    rng = np.random.default_rng(0)
    height, width, channels, units = 3, 4, 5, 6
    kernel = rng.standard_normal((height * width * channels, units))
    feature_map = rng.standard_normal((height, width, channels))
    conv_kernel = np.asarray(dense_to_conv_kernel(kernel, height, width, channels, order))
    assert conv_kernel.shape == (height, width, channels, units)
    np.testing.assert_allclose(
        _valid_conv_single_window(conv_kernel, feature_map), _dense_on_map(kernel, feature_map, order), rtol=1e-10
    )


def test_dense_to_conv_kernel_hwc_is_a_plain_reshape():
    kernel = np.arange(2 * 3 * 4 * 5, dtype="float32").reshape(24, 5)
    conv_kernel = np.asarray(dense_to_conv_kernel(kernel, 2, 3, 4))
    np.testing.assert_array_equal(conv_kernel[1, 2, 3], kernel[(1 * 3 + 2) * 4 + 3])


def test_dense_to_conv_kernel_keeps_dtype():
    kernel = np.ones((12, 2), dtype="float16")
    assert np.asarray(dense_to_conv_kernel(kernel, 2, 2, 3)).dtype == np.float16


def test_dense_to_conv_kernel_rejects_wrong_feature_count():
    with pytest.raises(ValueError, match="2 x 2 x 3 = 12"):
        dense_to_conv_kernel(np.ones((13, 2)), 2, 2, 3)


def test_pointwise_kernel():
    kernel = np.random.default_rng(1).standard_normal((7, 3))
    pointwise = np.asarray(dense_to_pointwise_kernel(kernel))
    assert pointwise.shape == (1, 1, 7, 3)
    np.testing.assert_array_equal(pointwise[0, 0], kernel)


@pytest.mark.parametrize(
    "flatten_format, tensor_format, expected",
    [
        ("channels_last", "channels_last", ("h", "w", "c")),
        ("channels_first", "channels_first", ("h", "w", "c")),
        ("channels_last", "channels_first", ("c", "h", "w")),
        ("channels_first", "channels_last", ("w", "c", "h")),
    ],
)
def test_flatten_axis_order(flatten_format, tensor_format, expected):
    assert flatten_axis_order(flatten_format, tensor_format) == expected


def test_flatten_axis_order_agrees_with_keras_flatten():
    import keras

    rng = np.random.default_rng(2)
    for flatten_format, tensor_format in itertools.product(["channels_last", "channels_first"], repeat=2):
        hwc = rng.standard_normal((1, 2, 3, 4)).astype("float32")
        stored = hwc if tensor_format == "channels_last" else np.transpose(hwc, (0, 3, 1, 2))
        flat = np.asarray(keras.layers.Flatten(data_format=flatten_format)(stored))[0]
        order = flatten_axis_order(flatten_format, tensor_format)
        expected = np.transpose(hwc[0], ["hwc".index(a) for a in order]).reshape(-1)
        np.testing.assert_array_equal(flat, expected)


def test_parameter_count():
    assert parameter_count([(6, 6, 256, 4096), (4096,)]) == 37_752_832


def test_fold_affine_into_dense_matches_dense_of_the_affine():
    rng = np.random.default_rng(3)
    kernel, bias = rng.standard_normal((6, 4)), rng.standard_normal(4)
    scale, shift, x = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal((5, 6))
    for with_bias in (bias, None):
        folded_kernel, folded_bias = fold_affine_into_dense(kernel, with_bias, scale, shift)
        expected = (x * scale + shift) @ kernel + (0 if with_bias is None else with_bias)
        np.testing.assert_allclose(x @ folded_kernel + folded_bias, expected, rtol=1e-12)


def test_batch_norm_affine_matches_keras_batchnorm_at_inference():
    import keras

    rng = np.random.default_rng(4)
    layer = keras.layers.BatchNormalization(epsilon=1e-3)
    layer.build((None, 5))
    for weight in layer.weights:
        weight.assign(rng.uniform(0.5, 2.0, 5) if "variance" in weight.name else rng.standard_normal(5))
    x = rng.standard_normal((3, 5)).astype("float32")
    scale, shift = batch_norm_affine(layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance, 1e-3)
    np.testing.assert_allclose(x * scale + shift, np.asarray(layer(x, training=False)), rtol=1e-5, atol=1e-6)


def test_fold_affine_into_dense_refuses_a_scale_or_a_shift_alone_of_the_wrong_shape():
    kernel = np.ones((6, 4))
    for scale, shift in ((np.ones(5), np.ones(6)), (np.ones(6), np.ones(5)), (np.ones((6, 1)), np.ones(6))):
        with pytest.raises(ValueError, match=r"shape \(6,\)"):
            fold_affine_into_dense(kernel, None, scale, shift)


@pytest.mark.parametrize("depthwise", [False, True])
def test_fold_affine_after_conv_matches_the_convolution_then_the_affine(depthwise):
    """One output cell of a 3x3 convolution (a Conv2D's, or a DepthwiseConv2D's of multiplier 2, whose output
    channel i * 2 + m reads input channel i), computed by einsum, then scaled and shifted per output channel."""
    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((3, 3, 4, 2) if depthwise else (3, 3, 4, 6))
    patch = rng.standard_normal((3, 3, 4))
    scale, shift, bias = rng.standard_normal(8 if depthwise else 6), rng.standard_normal(8), rng.standard_normal(8)
    shift, bias = shift[: scale.size], bias[: scale.size]

    def cell(k, b):
        out = np.einsum("hwi,hwim->im", patch, k).reshape(-1) if depthwise else np.einsum("hwi,hwiu->u", patch, k)
        return out + (0 if b is None else b)

    for with_bias in (bias, None):
        folded_kernel, folded_bias = fold_affine_after_conv(kernel, with_bias, scale, shift, depthwise=depthwise)
        expected = cell(kernel, with_bias) * scale + shift
        np.testing.assert_allclose(cell(folded_kernel, folded_bias), expected, rtol=1e-12)


def test_fold_affine_after_conv_refuses_a_scale_or_a_shift_of_the_wrong_shape():
    for kernel, depthwise, count in ((np.ones((3, 3, 4, 6)), False, 6), (np.ones((3, 3, 4, 2)), True, 8)):
        for scale, shift in ((np.ones(count - 1), np.ones(count)), (np.ones(count), np.ones(count + 1))):
            with pytest.raises(ValueError, match=rf"shape \({count},\)"):
                fold_affine_after_conv(kernel, None, scale, shift, depthwise=depthwise)
