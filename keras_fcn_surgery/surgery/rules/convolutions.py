"""Building a Conv2D that computes what a Dense computed."""

from __future__ import annotations

import keras

from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe
from keras_fcn_surgery.layout import Layout
from keras_fcn_surgery.surgery.cloning import call_with_initial_values
from keras_fcn_surgery.surgery.kernels import parameter_count
from keras_fcn_surgery.surgery.rules.base import Rewrite, RewriteKind

_CARRIED_KEYS = (
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "name",
    "trainable",
    "dtype",
)


def check_dense_is_plain(layer) -> None:
    """Refuse Dense layers whose weights are not a plain kernel and bias."""
    if getattr(layer, "lora_enabled", False):
        raise ConversionError(
            f"Layer {describe(layer)} has LoRA enabled. Merge the adapters first "
            "(`layer.kernel` already includes them): rebuild the Dense without `lora_rank` "
            "and set its kernel to the merged one."
        )
    if getattr(layer, "quantization_mode", None):
        raise ConversionError(
            f"Layer {describe(layer)} is quantized ({layer.quantization_mode}). "
            "Convert the float model, then quantize the result."
        )


def conv_like_dense(dense, kernel_size: tuple[int, int], data_format: str, use_bias: bool | None = None):
    """A Conv2D carrying the Dense's settings (activation, regularizers, dtype, name...)."""
    config = dense.get_config()
    carried = {key: config[key] for key in _CARRIED_KEYS if key in config}
    if use_bias is not None:
        carried["use_bias"] = use_bias
    if _needs_channel_softmax(dense, data_format):
        carried["activation"] = None
    return keras.layers.Conv2D(
        filters=config["units"],
        kernel_size=kernel_size,
        strides=1,
        padding="valid",
        data_format=data_format,
        **carried,
    )


def _needs_channel_softmax(dense, data_format: str) -> bool:
    """A softmax Dense on a channels-first map must normalize axis 1, not the last axis."""
    return Layout(data_format).channels_first and keras.activations.serialize(dense.activation) == "softmax"


def call_conv_from_dense(dense, conv, inputs, kernel, bias=None):
    """Call ``conv`` on ``inputs`` with its weights taken from ``dense`` (or ``bias`` when given).

    On a channels-first map a softmax activation moves into a `Softmax(axis=1)`
    layer named ``<dense>_softmax`` right after the convolution.
    """
    values = {"kernel_initializer": kernel}
    if bias is not None:
        values["bias_initializer"] = bias
    elif dense.use_bias:
        values["bias_initializer"] = dense.bias
    outputs = call_with_initial_values(conv, inputs, values)
    if _needs_channel_softmax(dense, conv.data_format):
        outputs = keras.layers.Softmax(axis=1, name=f"{dense.name}_softmax", dtype=conv.dtype_policy)(outputs)
    return outputs


def dense_rewrite(dense, kernel_shape: tuple[int, ...], detail: str = "") -> Rewrite:
    bias_shapes = ((int(dense.units),),) if dense.use_bias else ()
    old_shapes = (tuple(int(d) for d in dense.kernel.shape),) + bias_shapes
    new_shapes = (tuple(kernel_shape),) + bias_shapes
    return Rewrite(
        layer_name=dense.name,
        old_class="Dense",
        old_shapes=old_shapes,
        new_class="Conv2D",
        new_shapes=new_shapes,
        parameters=parameter_count(new_shapes),
        detail=detail,
        kind=RewriteKind.CONV_FROM_DENSE,
    )
