"""Pooling windows with holes: the max and average poolings of a rarefied (à trous) network.

Keras's poolings have no dilation. These subclasses add one (``dilation_rate``)
and compute the pool from ``pool_h * pool_w`` strided slices of the input, so a
cell's window is exactly that of the pooling it replaces, spread by the
removed strides. `valid` padding only (the rarefaction refuses the others).
Being subclasses of the Keras poolings, the geometry reads their window from
their configuration, as for any pooling.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_fcn_surgery.layout import Layout


def dilated_output_size(size, pool: int, stride: int, dilation: int):
    """Output length of a `valid` pooling of ``pool`` cells spread by ``dilation``, at ``stride``."""
    if size is None:
        return None
    return max(0, (size - dilation * (pool - 1) - 1) // stride + 1)


class _DilatedPooling:
    """The shared part of `DilatedMaxPooling2D` and `DilatedAveragePooling2D`."""

    def __init__(self, pool_size, strides=None, padding="valid", data_format=None, dilation_rate=(1, 1), **kwargs):
        super().__init__(pool_size, strides=strides, padding=padding, data_format=data_format, **kwargs)
        if self.padding != "valid":
            raise ValueError(f"A dilated pooling takes `valid` padding only. Received: {padding!r}")
        self.dilation_rate = tuple(int(d) for d in dilation_rate)

    def _slices(self, inputs):
        """The input under each of the pool's cells, every ``stride``-th position: static slices, any size."""
        axes = Layout(self.data_format).spatial_axes
        for i in range(self.pool_size[0]):
            for j in range(self.pool_size[1]):
                key = [slice(None)] * 4
                for axis, k, p, s, d in zip(axes, (i, j), self.pool_size, self.strides, self.dilation_rate):
                    key[axis] = slice(k * d, -(p - 1 - k) * d or None, s)
                yield inputs[tuple(key)]

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis, p, s, d in zip(
            Layout(self.data_format).spatial_axes, self.pool_size, self.strides, self.dilation_rate
        ):
            shape[axis] = dilated_output_size(shape[axis], p, s, d)
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "dilation_rate": self.dilation_rate}


@keras.saving.register_keras_serializable(package="keras_fcn_surgery")
class DilatedMaxPooling2D(_DilatedPooling, keras.layers.MaxPooling2D):
    """`MaxPooling2D` with a ``dilation_rate`` (`valid` padding)."""

    def call(self, inputs):
        result = None
        for part in self._slices(inputs):
            result = part if result is None else ops.maximum(result, part)
        return result


@keras.saving.register_keras_serializable(package="keras_fcn_surgery")
class DilatedAveragePooling2D(_DilatedPooling, keras.layers.AveragePooling2D):
    """`AveragePooling2D` with a ``dilation_rate`` (`valid` padding: every window is full)."""

    def call(self, inputs):
        total = None
        for part in self._slices(inputs):
            total = part if total is None else total + part
        return total / float(self.pool_size[0] * self.pool_size[1])
