"""Flatten + Dense becomes one Conv2D whose kernel covers the whole flattened map."""

from __future__ import annotations

from dataclasses import replace

import keras

from keras_fcn_surgery import taxonomy
from keras_fcn_surgery.errors import ConversionError
from keras_fcn_surgery.graph import describe
from keras_fcn_surgery.surgery.kernels import (
    batch_norm_affine,
    dense_to_conv_kernel,
    flatten_axis_order,
    fold_affine_into_dense,
)
from keras_fcn_surgery.surgery.rules.base import (
    FlattenedMap,
    NodeView,
    PermutedMap,
    Rewrite,
    RewriteKind,
    Rule,
    Spatial,
    Step,
    VectorMap,
    pass_through,
    remove,
)
from keras_fcn_surgery.surgery.rules.convolutions import (
    call_conv_from_dense,
    check_dense_is_plain,
    conv_like_dense,
    dense_rewrite,
)


class FlattenRule(Rule):
    """A Flatten of a spatial map disappears: the converted graph keeps the map.

    A Flatten of the head's vectors disappears too: on ``(N, C)`` it does
    nothing, and on a ``1 x 1`` map it only drops the unit axes.
    """

    layers = (keras.layers.Flatten,)
    modes = (Spatial, VectorMap, PermutedMap)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        if isinstance(mode, PermutedMap):
            sizes = dict(zip(mode.axes, (int(d) for d in view.input_shapes[0][1:])))
            order = flatten_axis_order(view.layer.data_format, view.context.data_format, stored=mode.axes)
            flattened = FlattenedMap(sizes["h"], sizes["w"], sizes["c"], order, view.layer.name)
            detail = f"keeps the {sizes['h']}x{sizes['w']}x{sizes['c']} map (features in {''.join(order)} order)"
            return remove(view, flattened, detail)
        if isinstance(mode, VectorMap):
            if mode.unit_map:
                return remove(view, VectorMap(origin=mode.origin), "flattens a 1x1 map")
            if len(view.input_shapes[0]) == 2:
                return remove(view, mode, "flattens a vector: nothing to do")
            return None
        if len(view.input_shapes[0]) != 4:
            return None
        shape = view.input_shapes[0]
        height, width = view.context.spatial_shape(shape)
        channels = view.context.channels(shape)
        if None in (height, width, channels):
            raise ConversionError(
                f"Layer {describe(view.layer)} flattens a map of unknown size {tuple(shape)[1:]}, so the "
                "kernel of the Dense after it cannot be laid out. Give the model a fixed input size "
                "(`keras.Input(shape=(H, W, C))`) or pass `input_size=(H, W)` to `convert`."
            )
        order = flatten_axis_order(view.layer.data_format, view.context.data_format)
        mode = FlattenedMap(int(height), int(width), int(channels), order, view.layer.name)
        return remove(view, mode, f"keeps the {height}x{width}x{channels} map")


class PermuteBeforeFlattenRule(Rule):
    """A Permute of the last map, read only by Flatten layers, folds into the Dense after them.

    It reorders the features the Dense reads (mtcnn's RNet and ONet swap height
    and width before flattening); the converted graph keeps the map as it is
    and lays the Dense's kernel out in that order, which is exact.
    """

    layers = (keras.layers.Permute,)
    modes = (Spatial,)

    def claim(self, view: NodeView) -> Step | None:
        if not isinstance(view.only_mode, Spatial) or len(view.input_shapes[0]) != 4:
            return None
        readers = view.consumers.get(id(view.node.outputs[0]), [])
        if not readers or not all(isinstance(node.operation, taxonomy.FLATTEN) for node in readers):
            return None
        stored = ("h", "w", "c") if view.context.layout.channels_last else ("c", "h", "w")
        axes = tuple(stored[d - 1] for d in view.layer.dims)
        mode = PermutedMap(axes, view.layer.name)
        return remove(view, mode, f"folded into the Dense after the Flatten ({''.join(axes)})", RewriteKind.FOLDED)


class DenseOnFlattenedMapRule(Rule):
    """The first Dense after a Flatten becomes an H x W ``valid`` convolution."""

    layers = (keras.layers.Dense,)
    modes = (FlattenedMap,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        if not isinstance(mode, FlattenedMap):
            return None
        dense = view.layer
        check_dense_is_plain(dense)
        context = view.context
        kernel_size = (mode.height, mode.width)

        def build(args, kwargs):
            kernel, bias = dense.kernel, None
            if mode.affine is not None:
                kernel, bias = fold_affine_into_dense(kernel, dense.bias if dense.use_bias else None, *mode.affine)
            conv = conv_like_dense(dense, kernel_size, context.data_format, use_bias=dense.use_bias or bias is not None)
            kernel = dense_to_conv_kernel(kernel, mode.height, mode.width, mode.channels, mode.axis_order)
            return [call_conv_from_dense(dense, conv, args[0], kernel, bias)]

        kernel_shape = (mode.height, mode.width, mode.channels, int(dense.units))
        order = "".join(mode.axis_order).upper()
        detail = f"{mode.height}x{mode.width} valid" + ("" if order == "HWC" else f", rows reordered from {order}")
        if mode.affine is not None:
            detail += f", {mode.affine_from} folded in"
        return Step([VectorMap(origin=dense.name)], build, dense_rewrite(dense, kernel_shape, detail))


class BatchNormOnFlattenedMapRule(Rule):
    """A BatchNormalization of flattened features is, at inference, a per-feature affine map.

    It cannot act on a score map (its parameters are tied to positions in one
    window), but the Dense that reads its output absorbs it exactly.
    """

    layers = (keras.layers.BatchNormalization,)
    modes = (FlattenedMap,)

    def claim(self, view: NodeView) -> Step | None:
        mode = view.only_mode
        layer = view.layer
        if not isinstance(mode, FlattenedMap) or mode.affine is not None or layer.axis not in (-1, 1, [-1], [1]):
            return None
        scale, shift = batch_norm_affine(
            layer.gamma if layer.scale else None,
            layer.beta if layer.center else None,
            layer.moving_mean,
            layer.moving_variance,
            layer.epsilon,
        )
        folded = replace(mode, affine=(scale, shift), affine_from=layer.name)
        features = int(scale.shape[0])
        rewrite = Rewrite(
            layer.name,
            "BatchNormalization",
            ((features,),),
            "(folded)",
            (),
            0,
            "into the next Dense's kernel and bias",
            RewriteKind.FOLDED,
        )
        return pass_through(folded, rewrite)
