"""Layers that follow the first head convolution and work on per-window vectors."""

from __future__ import annotations

import keras
import numpy as np

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe, finalize_state
from keras_fcn_surgery.surgery.kernels import dense_to_pointwise_kernel
from keras_fcn_surgery.surgery.rules.base import (
    FlattenedMap,
    NodeView,
    Rewrite,
    RewriteKind,
    Rule,
    Step,
    VectorMap,
    copy_layer,
    remove,
)
from keras_fcn_surgery.surgery.rules.convolutions import (
    call_conv_from_dense,
    check_dense_is_plain,
    conv_like_dense,
    dense_rewrite,
)


def _activation_name(layer) -> str:
    return taxonomy.activation_name(layer.get_config().get("activation"))


def _is_channel_axis(axis, rank: int, context) -> bool:
    """Whether ``axis`` of a source tensor of this rank is its feature (channel) axis."""
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    if len(axes) != 1:
        return False
    normalized = axes[0] % rank
    if rank == 2:
        return normalized == 1
    return normalized == (rank - 1 if context.layout.channels_last else 1)


def _clone_with(layer, **overrides):
    config = layer.get_config()
    config.update(overrides)
    return layer.__class__.from_config(config)


def _call_and_copy(layer, new_layer, args, kwargs):
    outputs = new_layer(*args, **kwargs)
    for old, new in zip(layer.weights, new_layer.weights):
        new.assign(old.value)
    finalize_state(new_layer)
    return [outputs]


class DenseOnVectorMapRule(Rule):
    """A Dense on per-window vectors becomes a 1x1 convolution."""

    layers = (keras.layers.Dense,)
    modes = (VectorMap,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        if not isinstance(mode, VectorMap):
            return None
        if mode.unit_map and view.context.layout.channels_first:
            return None  # A Dense on a (N, C, 1, 1) map reads the last 1-sized axis: not a head layer.
        dense = view.layer
        check_dense_is_plain(dense)
        context = view.context

        def build(args, kwargs):
            conv = conv_like_dense(dense, (1, 1), context.data_format)
            return [call_conv_from_dense(dense, conv, args[0], dense_to_pointwise_kernel(dense.kernel))]

        kernel_shape = (1, 1, int(dense.kernel.shape[0]), int(dense.units))
        return Step([mode], build, dense_rewrite(dense, kernel_shape, "1x1"))


class ElementwiseRule(Rule):
    """Dropout, activations and the like carry over unchanged."""

    modes = (VectorMap, FlattenedMap)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        if mode is None:
            return None
        layer = view.layer
        # A per-feature scale or offset (Rescaling) would hit the wrong values on a map.
        elementwise = taxonomy.is_elementwise(layer)
        if isinstance(mode, FlattenedMap) and mode.affine is not None:
            # A folded BatchNormalization must reach the Dense unchanged: only layers that
            # are the identity at inference may sit between them.
            elementwise = isinstance(layer, taxonomy.INFERENCE_IDENTITY)
        return copy_layer(view) if elementwise else None


class ChannelAxisRule(Rule):
    """Softmax, BatchNormalization, LayerNormalization... keep acting on the channel axis."""

    layers = (keras.layers.Activation, *taxonomy.CHANNEL_AXIS)
    modes = (VectorMap,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        layer = view.layer
        if mode is None:
            return None
        context = view.context
        rank = len(view.input_shapes[0])
        if isinstance(layer, taxonomy.ACTIVATIONS):
            if _activation_name(layer) not in taxonomy.AXIS_ACTIVATIONS:
                return None
            if context.layout.channels_last:
                return copy_layer(view)
            if _activation_name(layer) != "softmax":
                raise ConversionError(
                    f"Layer {describe(layer)} applies {_activation_name(layer)} along the last axis, which is "
                    "not the channel axis of a channels-first score map. Use a softmax head, or a "
                    "channels-last model."
                )

            def build_softmax(args, kwargs):
                return [keras.layers.Softmax(axis=1, name=layer.name, dtype=layer.dtype_policy)(args[0])]

            kind = RewriteKind.AXIS_MOVED
            rewrite = Rewrite(layer.name, "Activation", (), "Softmax", (), 0, "softmax on axis 1", kind)
            return Step([mode], build_softmax, rewrite)
        if not _is_channel_axis(layer.axis, rank, context):
            raise ConversionError(
                f"Layer {describe(layer)} normalizes over axis {layer.axis} of a rank-{rank} tensor, "
                "which is not the feature axis; on a score map it would mix windows. "
                "Only channel-axis normalization can follow the head convolution."
            )
        axis = context.channel_axis

        def build(args, kwargs):
            return _call_and_copy(layer, _clone_with(layer, axis=axis), args, kwargs)

        return Step([mode], build)


class ParametricElementwiseRule(Rule):
    """A PReLU on per-window vectors is a PReLU on the map that shares its weights over space.

    Its per-feature ``alpha`` of shape ``(F,)`` (or ``(1, 1, F)`` on a head's
    ``1 x 1`` map) becomes ``(1, 1, F)`` (``(F, 1, 1)`` for channels-first)
    with the spatial axes shared: each cell's features meet the same slopes as
    the classifier's vector did (mtcnn's RNet and ONet). A slope shared by
    every feature stays one slope, shared over the map's every axis.
    """

    layers = taxonomy.PARAMETRIC_ELEMENTWISE
    modes = (VectorMap,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        layer = view.layer
        if not isinstance(mode, VectorMap) or len(view.input_shapes[0]) != (4 if mode.unit_map else 2):
            return None
        context = view.context
        channel_axis = 1 if context.layout.channels_first else 3
        spatial = [2, 3] if context.layout.channels_first else [1, 2]
        slopes = int(np.prod(tuple(layer.alpha.shape)))
        features = int(context.channels(view.input_shapes[0]) if mode.unit_map else view.input_shapes[0][-1])
        if slopes not in (1, features):
            return None
        shared = spatial if slopes == features else sorted([*spatial, channel_axis])
        shape = (slopes, 1, 1) if context.layout.channels_first else (1, 1, slopes)

        def build(args, kwargs):
            prelu = _clone_with(layer, shared_axes=shared)
            outputs = prelu(*args, **kwargs)
            prelu.alpha.assign(keras.ops.reshape(layer.alpha.value, shape))
            return [outputs]

        kind = RewriteKind.AXIS_MOVED
        before = tuple(layer.alpha.shape)
        rewrite = Rewrite(layer.name, "PReLU", (before,), "PReLU", (shape,), slopes, "shared over space", kind)
        return Step([mode], build, rewrite)


class MergeRule(Rule):
    """Add, Concatenate and friends of per-window vectors from parallel head branches."""

    layers = taxonomy.MERGES
    modes = (VectorMap,)

    def claim(self, view: NodeView) -> Step | None:
        layer = view.layer
        modes = view.input_modes
        if len({mode.unit_map for mode in modes if isinstance(mode, VectorMap)}) != 1:
            return None
        context = view.context
        output_mode = modes[0]
        if isinstance(layer, taxonomy.CONCATENATIONS):
            if not _is_channel_axis(layer.axis, len(view.input_shapes[0]), context):
                raise ConversionError(
                    f"Layer {describe(layer)} concatenates head vectors along axis {layer.axis}, "
                    "not the feature axis. Concatenate features along the last axis."
                )
            return Step(
                [output_mode],
                lambda args, kwargs: _call_and_copy(layer, _clone_with(layer, axis=context.channel_axis), args, kwargs),
            )
        return copy_layer(view, output_mode)


class ReshapeRule(Rule):
    """Reshape between ``(C,)`` and a ``1 x 1`` map of C channels, as keras.applications heads do."""

    layers = (keras.layers.Reshape,)
    modes = (VectorMap,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        if not isinstance(mode, VectorMap):
            return None
        context = view.context
        source_in, source_out = view.input_shapes[0], view.output_shapes[0]
        if mode.unit_map and len(source_out) == 2:
            return remove(view, VectorMap(mode.origin), "1x1 map to vector")
        if not mode.unit_map and len(source_in) == 2 and len(source_out) == 4:
            if tuple(context.spatial_shape(source_out)) == (1, 1):
                return remove(view, VectorMap(mode.origin, unit_map=True), "vector to 1x1 map")
        return None


class UnitMapConvRule(Rule):
    """A 1x1 convolution on the head's 1x1 map is already a per-window layer."""

    layers = (keras.layers.Conv2D,)
    modes = (VectorMap,)

    def claim(self, view: NodeView) -> Step | None:
        layer = view.layer
        mode = view.only_mode
        if not (isinstance(mode, VectorMap) and mode.unit_map):
            return None
        if tuple(layer.kernel_size) != (1, 1) or tuple(layer.strides) != (1, 1):
            raise ConversionError(
                f"Layer {describe(layer)} applies a {layer.kernel_size} kernel with strides {layer.strides} "
                "to the head's 1x1 map: there it sees only one tap, but on a score map it would mix "
                "neighbouring windows. Use a 1x1 kernel with stride 1 in the head."
            )
        return copy_layer(view)
