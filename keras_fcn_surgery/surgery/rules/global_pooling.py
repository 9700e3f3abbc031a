"""Global pooling heads (ResNet, MobileNet, EfficientNet...) on a map of windows.

``head="window"``: the global pooling becomes a pooling whose window is the
feature map's size at the original input size, stride 1, ``valid`` padding, so
every output cell is the classifier on one original-size window.
``head="dense"``: the pooling is dropped and the classifier runs at every
feature-map position (a class activation map).
"""

from __future__ import annotations

import keras

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe
from keras_fcn_surgery.surgery.rules.base import (
    SPATIAL,
    NodeView,
    Rewrite,
    RewriteKind,
    Rule,
    Spatial,
    Step,
    VectorMap,
    copy_layer,
    remove,
)


class SqueezeExcitationRule(Rule):
    """A global pooling whose result is merged back into a feature map belongs to the body.

    That is squeeze-and-excitation (EfficientNet, MobileNetV3): the pooled
    vector gates the map it came from. In the FCN it keeps pooling over the
    whole image (`keras_fcn_surgery.geometry` reports ``global_context``).
    """

    layers = taxonomy.GLOBAL_POOLINGS
    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        for consumer, outsiders in view.downstream():
            if isinstance(consumer.operation, taxonomy.MERGES_INTO_MAP) and any(
                _is_large_map(t, view) for t in outsiders
            ):
                return copy_layer(view, SPATIAL)
        return None


def _is_large_map(tensor, view: NodeView) -> bool:
    shape = tuple(tensor.shape)
    return len(shape) == 4 and any(d is None or d > 1 for d in view.context.spatial_shape(shape))


class GlobalPoolingRule(Rule):
    """The head's global pooling becomes a window pooling or disappears."""

    layers = taxonomy.GLOBAL_POOLINGS
    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        layer = view.layer
        replacement = taxonomy.WINDOW_POOLING_OF.get(type(layer))
        if replacement is None:
            return None
        context = view.context
        keepdims = bool(layer.keepdims)
        output_mode = VectorMap(origin=layer.name, unit_map=keepdims)
        if context.head == "dense":
            return remove(view, output_mode, "classifier at every position", RewriteKind.POOLING_REMOVED)
        height, width = context.spatial_shape(view.input_shapes[0])
        if height is None or width is None:
            raise ConversionError(
                f"Layer {describe(layer)} pools a map of unknown size, so the window of the "
                "`head='window'` pooling is unknown. Pass `input_size=(H, W)`, the size the "
                "classifier was trained at, or use `head='dense'`."
            )
        pool_size = (int(height), int(width))

        def build(args, kwargs):
            pooling = replacement(
                pool_size=pool_size,
                strides=1,
                padding="valid",
                data_format=context.data_format,
                name=layer.name,
                dtype=_accumulating_policy(layer.dtype_policy),
            )
            return [pooling(args[0])]

        rewrite = Rewrite(
            layer.name,
            type(layer).__name__,
            (),
            replacement.__name__,
            (),
            0,
            f"pool {height}x{width}, stride 1",
            RewriteKind.POOL_WINDOW,
        )
        return Step([output_mode], build, rewrite)


def _accumulating_policy(policy):
    """The replacement pooling's dtype policy: float32 arithmetic for a half-precision one.

    Measured on TensorFlow 2.21's CPU kernels: a bfloat16 global mean stays
    close to the exact mean, while a bfloat16 AveragePooling2D over a map-sized
    window drifts far past bfloat16's own rounding (and a LayerNormalization
    after it amplifies that past the bfloat16 tolerance: 11 of 1200 fuzzed
    conversions). Pooling the window in float32 keeps the replacement at least
    as close to exact arithmetic as the source.
    """
    if policy.compute_dtype in ("float16", "bfloat16"):
        return keras.DTypePolicy("float32")
    return policy
