"""Pure functions that turn Dense kernels into convolution kernels.

Keras stores every Conv2D kernel as ``(kernel_h, kernel_w, in_channels,
filters)`` whatever the layer's ``data_format``; a Dense kernel is
``(in_features, units)``. The only question is the order in which the
Flatten that fed the Dense laid out the ``in_features``: that order is given
as a permutation of the axis names ``"h"``, ``"w"`` and ``"c"``.

The functions accept NumPy arrays or backend tensors (including variables)
and use ``keras.ops`` so that a large kernel is reshaped without a host copy.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

from keras_fcn_surgery.layout import Layout

CONV_AXIS_ORDER = ("h", "w", "c")


def flatten_axis_order(flatten_data_format: str, tensor_data_format: str, stored=None) -> tuple[str, ...]:
    """Order in which a Flatten lays out the axes of a rank-4 map.

    Args:
        flatten_data_format: the Flatten layer's ``data_format``.
        tensor_data_format: the layout of the map it flattens
            (the convolutions' ``data_format``).
        stored: the map's axes as stored, when a Permute reordered them
            (e.g. ``("w", "h", "c")``); default: the layout's own order.

    Returns:
        A permutation of ``("h", "w", "c")``, slowest-varying axis first.

    Keras's Flatten leaves a ``channels_last`` input as it is and transposes a
    ``channels_first`` one with axes ``(0, 2, 3, 1)`` before reshaping, so it
    reads the tensor's stored axes in the order (2, 3, 1) in that case.
    """
    if stored is None:
        stored = ("h", "w", "c") if Layout(tensor_data_format).channels_last else ("c", "h", "w")
    stored = tuple(stored)
    if Layout(flatten_data_format).channels_last:
        return stored
    return (stored[1], stored[2], stored[0])


def dense_to_conv_kernel(kernel, height: int, width: int, channels: int, axis_order=CONV_AXIS_ORDER):
    """Reshape a Dense kernel that reads a flattened map into a Conv2D kernel.

    Args:
        kernel: array of shape ``(height * width * channels, units)``.
        height, width, channels: the map's size at the Flatten.
        axis_order: order of the flattened features, from
            `flatten_axis_order`.

    Returns:
        An array of shape ``(height, width, channels, units)``.
    """
    in_features, units = (int(d) for d in kernel.shape)
    expected = height * width * channels
    if in_features != expected:
        raise ValueError(
            f"Expected a Dense kernel with {height} x {width} x {channels} = {expected} "
            f"input features. Received: kernel.shape={tuple(kernel.shape)}"
        )
    if sorted(axis_order) != sorted(CONV_AXIS_ORDER):
        raise ValueError(f"Expected `axis_order` to be a permutation of {CONV_AXIS_ORDER}. Received: {axis_order}")
    sizes = {"h": height, "w": width, "c": channels}
    unflattened = ops.reshape(kernel, [sizes[a] for a in axis_order] + [units])
    permutation = [axis_order.index(a) for a in CONV_AXIS_ORDER] + [3]
    if permutation == [0, 1, 2, 3]:
        return unflattened
    return ops.transpose(unflattened, permutation)


def dense_to_pointwise_kernel(kernel):
    """Reshape a Dense kernel ``(in, units)`` into a 1x1 Conv2D kernel ``(1, 1, in, units)``."""
    in_features, units = (int(d) for d in kernel.shape)
    return ops.reshape(kernel, (1, 1, in_features, units))


def fold_affine_into_dense(kernel, bias, scale, shift):
    """Fold ``x -> x * scale + shift`` (per input feature) into the Dense that reads ``x``.

    ``Dense(x * scale + shift) = x @ (scale[:, None] * kernel) + (shift @ kernel + bias)``.

    Args:
        kernel: ``(in, units)`` array; bias: ``(units,)`` array or None.
        scale, shift: ``(in,)`` arrays.

    Returns:
        ``(kernel, bias)`` as float64 NumPy arrays.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    if scale.shape != (kernel.shape[0],) or shift.shape != (kernel.shape[0],):
        raise ValueError(
            f"Expected `scale` and `shift` of shape ({kernel.shape[0]},). "
            f"Received: scale.shape={scale.shape}, shift.shape={shift.shape}"
        )
    folded_bias = shift @ kernel
    if bias is not None:
        folded_bias = folded_bias + np.asarray(bias, dtype=np.float64)
    return kernel * scale[:, None], folded_bias


def fold_affine_after_conv(kernel, bias, scale, shift, *, depthwise: bool = False):
    """Fold ``y -> y * scale + shift`` (per output channel) into the convolution that makes ``y``.

    ``conv(x; k, b) * s + t = conv(x; k * s, b * s + t)``, each output channel
    scaled alike: a Conv2D's last kernel axis is its output channels; a
    DepthwiseConv2D's ``(h, w, in, multiplier)`` kernel makes output channel
    ``i * multiplier + m`` from input channel ``i``.

    Args:
        kernel: the convolution's kernel; bias: its ``(out,)`` bias or None.
        scale, shift: ``(out,)`` arrays.
        depthwise: whether the kernel is a DepthwiseConv2D's.

    Returns:
        ``(kernel, bias)`` as float64 NumPy arrays.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    outputs = kernel.shape[-2] * kernel.shape[-1] if depthwise else kernel.shape[-1]
    if scale.shape != (outputs,) or shift.shape != (outputs,):
        raise ValueError(
            f"Expected `scale` and `shift` of shape ({outputs},). "
            f"Received: scale.shape={scale.shape}, shift.shape={shift.shape}"
        )
    per_channel = scale.reshape(kernel.shape[-2:]) if depthwise else scale
    folded_bias = shift if bias is None else np.asarray(bias, dtype=np.float64) * scale + shift
    return kernel * per_channel, folded_bias


def batch_norm_affine(gamma, beta, moving_mean, moving_variance, epsilon: float):
    """Inference-time BatchNormalization as ``x * scale + shift``; None for an absent gamma or beta."""
    mean = np.asarray(moving_mean, dtype=np.float64)
    scale = 1.0 / np.sqrt(np.asarray(moving_variance, dtype=np.float64) + epsilon)
    if gamma is not None:
        scale = scale * np.asarray(gamma, dtype=np.float64)
    shift = -mean * scale
    if beta is not None:
        shift = shift + np.asarray(beta, dtype=np.float64)
    return scale, shift


def parameter_count(shapes) -> int:
    """Number of scalars in weights of the given shapes."""
    return sum(math.prod(shape) for shape in shapes)
