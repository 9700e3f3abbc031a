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
from keras_fcn_surgery.graph import describe, is_layer, reduction_of
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
        return _pooled_head(view, replacement, bool(layer.keepdims))


class GlobalReductionRule(Rule):
    """``keras.ops.mean`` / ``keras.ops.max`` over a map's two spatial axes in the head: a global pooling.

    Subclassed models often pool this way (``ops.mean(x, axis=(1, 2))``).
    It is rewritten as the layer would be; one that gates the map it came
    from (squeeze-and-excitation) is left to the body, like the layer.
    """

    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        operation = view.layer
        if is_layer(operation) or len(view.input_shapes) != 1 or len(view.input_shapes[0]) != 4:
            return None
        replacement = taxonomy.WINDOW_POOLING_OF_REDUCTION.get(type(operation).__name__)
        axes, keepdims = reduction_of(operation)
        spatial = sorted(a % 4 for a in view.context.layout.spatial_axes) if replacement is not None else None
        if axes is None or sorted(a % 4 for a in axes) != spatial:
            return None
        if SqueezeExcitationRule().claim(view) is not None:
            return None
        return _pooled_head(view, replacement, keepdims)


def _pooled_head(view: NodeView, replacement, keepdims: bool) -> Step:
    """A global pooling of the head (a layer or an operation) as ``replacement`` over one original window."""
    layer = view.layer
    context = view.context
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
    policy = layer.dtype_policy if is_layer(layer) else keras.config.dtype_policy()

    def build(args, kwargs):
        pooling = replacement(
            pool_size=pool_size,
            strides=1,
            padding="valid",
            data_format=context.data_format,
            name=layer.name,
            dtype=_accumulating_policy(policy),
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
